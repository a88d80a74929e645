"""Known third-party noise kept out of the user's terminal, in one place.

Each entry below is one message a library prints on every run, that says nothing the user can act on; it is
dropped by its logger (or warning module) and its own text, never by level or by library, so every other warning of
the same libraries still shows. `quiet_known_noise()` installs the filters; `llmft/__init__.py` calls it, so every
entry point (finetune.py, the `llmft` command, tools/*.py, `python -m llmft...`, each rank of a launcher) has them in
place before transformers, bitsandbytes or torchao is imported.

GPTQModel's start-up banner is not filtered but avoided: GPTQModel is imported only where it is used
(`llmft.tools.quantize`, and transformers/PEFT for a GPTQ base), and `without_unused_gptqmodel` keeps PEFT from
importing it for a base that has none of its layers. Where it is used, `quiet_gptqmodel` keeps its informational
output (the banner, environment notes, the per-stage timing tables, the saved configs) off the screen and lets its
warnings, errors and progress bars through; `llmft quantize --verbose` shows everything.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownNoise:
    logger: str  # the library's logger that emits it
    message: str  # the start of its format string (`record.msg`, before %-arguments are filled in)
    why: str  # why dropping it hides nothing the user needs
    from_module: str | None = None  # only when the record's first argument comes from this package (its __module__)


KNOWN_NOISE = (
    KnownNoise(
        "bitsandbytes.backends.cpu.ops",
        "Failed to load CPU gemm_4bit_forward from kernels-community",
        "bitsandbytes 0.50, imported through transformers' TrainingArguments on any CPU with AVX512-BF16, tries the "
        "optional `kernels` package's 4-bit GEMM from the Hub and falls back to its own CPU kernel, on every run, "
        "Q-LoRA or not",
    ),
    KnownNoise(
        "torch.utils._pytree",
        "%s is an Enum subclass and is now natively supported by torch.compile",
        "torchao 0.18 (imported by PEFT and transformers when installed) registers its enums as pytree constants, "
        "which torch 2.14 deprecates; a message for torchao's authors, printed twice before every run and chat "
        "prompt",
        from_module="torchao",
    ),
)

# (message regex, category, module regex) for warnings.filterwarnings: deprecations inside third-party code, raised
# where that code runs, which no llmft flag can change.
KNOWN_WARNINGS = (
    # transformers 5.23's own deprecated alias, read by library code while PEFT wraps and the Trainer prepares the
    # model (llmft never reads it)
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils"),
)


class _DropKnownNoise(logging.Filter):
    def __init__(self, noise: tuple[KnownNoise, ...]) -> None:
        super().__init__()
        self.noise = noise

    def filter(self, record: logging.LogRecord) -> bool:
        for noise in self.noise:
            if not isinstance(record.msg, str) or not record.msg.startswith(noise.message):
                continue
            if noise.from_module is None:
                return False
            first = record.args[0] if isinstance(record.args, tuple) and record.args else None
            module = getattr(first, "__module__", None) or ""
            if module == noise.from_module or module.startswith(noise.from_module + "."):
                return False
        return True


def quiet_known_noise() -> None:
    """Install the filters for KNOWN_NOISE and KNOWN_WARNINGS (once per process; calling again changes nothing)."""
    by_logger: dict[str, list[KnownNoise]] = {}
    for noise in KNOWN_NOISE:
        by_logger.setdefault(noise.logger, []).append(noise)
    for name, noise in by_logger.items():
        logger = logging.getLogger(name)  # the library's own logger object, made now if it is not imported yet
        if not any(isinstance(f, _DropKnownNoise) for f in logger.filters):
            logger.addFilter(_DropKnownNoise(tuple(noise)))
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


@contextlib.contextmanager
def without_unused_gptqmodel() -> Iterator[None]:
    """PEFT as if GPTQModel were not installed, while GPTQModel is not imported yet.

    PEFT 0.21's LoRA dispatch asks of every target layer whether it is a GPTQModel layer, importing GPTQModel to find
    out (peft/tuners/lora/awq.py, `is_gptqmodel_awq_layer`). Importing GPTQModel 7.3 prints its banner and a GIL
    notice to stdout and sets PYTORCH_ALLOC_CONF and CUDA_DEVICE_ORDER for the process, in LoRA runs that never
    touch GPTQ. While GPTQModel is not imported, no layer of the model can be one of its classes, so PEFT is shown
    the state it already supports, GPTQModel not installed (`sys.modules["gptqmodel"] = None`), and given the real one
    back afterwards: PEFT's cached availability answer is cleared on the way in and out, and transformers' is asked
    first, so that neither keeps the pretended one."""
    if "gptqmodel" in sys.modules:  # already imported (a GPTQ base, a quantize run): its layers may be in the model
        yield
        return
    from peft import import_utils as peft_imports
    from transformers.utils import is_gptqmodel_available

    is_gptqmodel_available()  # transformers caches its answer: let it cache the true one
    forget = getattr(peft_imports.is_gptqmodel_available, "cache_clear", lambda: None)
    forget()
    sys.modules["gptqmodel"] = None  # find_spec answers None and `import gptqmodel` raises ImportError
    try:
        yield
    finally:
        if "gptqmodel" in sys.modules and sys.modules["gptqmodel"] is None:
            del sys.modules["gptqmodel"]
        forget()


@contextlib.contextmanager
def quiet_gptqmodel(verbose: bool = False) -> Iterator[None]:
    """GPTQModel (7.3) without its informational output, for the block; a no-op with `verbose`.

    GPTQModel logs through LogBar (the `logbar` package), a logger of its own that writes to stdout and that LogBar
    creates at level INFO: its banner, environment notes and GIL notice at import, a per-stage timing table (about
    40 lines) as it quantizes and the JSON of every config it saves come at INFO or on import, so the block runs at
    WARNING (ERROR while GPTQModel is first imported: the GIL notice, a WARN, is about free-threaded Python, and
    tells a user of llmft nothing to do), and the previous level comes back after it. What GPTQModel prints with
    print() while saving (`debug_saved_config`: the folder's file list and configs) goes through `saving_quietly`."""
    if verbose:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):  # LogBar prints a blank line when it is created
        from logbar import LogBar

        logbar = LogBar.shared()  # GPTQModel's logger; created here at INFO if GPTQModel has not made it yet
    previous = logbar.level
    try:
        if "gptqmodel" not in sys.modules:
            logbar.setLevel(logging.ERROR)
            # GPTQModel's import looks for a CUDA toolkit to build its kernels with, and torch then warns, on every
            # machine without a GPU that has one installed, "No CUDA runtime is found": nothing a user acts on
            extension_logger = logging.getLogger("torch.utils.cpp_extension")
            no_cuda_note = _DropKnownNoise(
                (KnownNoise("torch.utils.cpp_extension", "No CUDA runtime is found", "GPTQModel's kernel lookup"),)
            )
            extension_logger.addFilter(no_cuda_note)
            try:
                with contextlib.redirect_stdout(sys.stderr):
                    import gptqmodel  # noqa: F401  (its import-time notices, at ERROR)
            finally:
                extension_logger.removeFilter(no_cuda_note)
        logbar.setLevel(logging.WARNING)
        yield
    finally:
        logbar.setLevel(previous)


@contextlib.contextmanager
def saving_quietly(verbose: bool = False) -> Iterator[None]:
    """Hold what is printed to stdout during the block (GPTQModel's `save` prints the saved folder's file list and
    configs) and show it only if the block fails, where it may tell why; a no-op with `verbose`."""
    if verbose:
        yield
        return
    held = io.StringIO()
    try:
        with contextlib.redirect_stdout(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise
