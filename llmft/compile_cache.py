"""Where a run keeps the kernels it compiles, so that it compiles them once, not again on every node and restart.

PyTorch's compiler (inductor, behind torch.compile and flex attention) and Triton (Liger's kernels, and inductor's
own output) cache what they compile; by default inductor's cache lies in the node's temporary folder
(/tmp/torchinductor_USER), so every fresh node of a cluster job, and every requeued job that lands on other nodes,
compiles again before its first step. llmft points both caches at one folder on the run's own file system:

- `LLMFT_COMPILE_CACHE` when set: a folder that every node mounts gives one cache to all runs of a cluster;
- else `<output_dir>/_compile_cache`: the run's nodes, its resumed sessions and its requeued jobs share it, and
  nothing the run writes lies outside its output folder (the leading underscore keeps it out of what the Trainer's
  `--push_to_hub` uploads, which is everything but `_*` and `checkpoint-*`; `--overwrite_output_dir` keeps it);

with `TORCHINDUCTOR_CACHE_DIR=<folder>/inductor` and `TRITON_CACHE_DIR=<folder>/triton`. A variable the user has set
is kept as it is. The launchers set them (`--dry-run` shows them), and finetune.py sets them before anything can
compile (`use_compile_cache`), so a plain `python finetune.py` gets the same. The caches write each entry under a
temporary name and rename it into place, so the ranks and nodes of a run can share one folder; nothing is written
there unless something compiles.

Standard library only: llmft.launch.launcher imports this module before any heavy package loads.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, Mapping, MutableMapping, Optional

logger = logging.getLogger(__name__)

COMPILE_CACHE_ENV = "LLMFT_COMPILE_CACHE"  # the user's folder for compiled kernels (shared between runs)
DEFAULT_FOLDER = "_compile_cache"  # inside the output folder when LLMFT_COMPILE_CACHE is not set
CACHE_VARIABLES = (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton"))

# What use_compile_cache put into this process's environment: a value still equal to it was not the user's, so a
# second run in the same process (a notebook, the tests) gets its own output folder's cache, not the first one's.
_set_here: Dict[str, str] = {}


def compile_cache_folder(output_dir: str, environ: Mapping[str, str]) -> str:
    """The folder that holds the run's compiled kernels: LLMFT_COMPILE_CACHE, else <output_dir>/_compile_cache;
    an absolute path (the ranks may start elsewhere)."""
    chosen = environ.get(COMPILE_CACHE_ENV) or os.path.join(output_dir, DEFAULT_FOLDER)
    return os.path.abspath(os.path.expanduser(chosen))


def compile_cache_env(output_dir: str, environ: Mapping[str, str]) -> Dict[str, str]:
    """The cache variables to add to `environ` for a run into `output_dir`: each of TORCHINDUCTOR_CACHE_DIR and
    TRITON_CACHE_DIR that the user has not set (empty counts as not set)."""
    folder = compile_cache_folder(output_dir, environ)
    return {
        name: os.path.join(folder, sub)
        for name, sub in CACHE_VARIABLES
        if not environ.get(name) or environ.get(name) == _set_here.get(name)
    }


def use_compile_cache(output_dir: str, environ: Optional[MutableMapping[str, str]] = None) -> Dict[str, str]:
    """Point this process's compile caches at the run's folder (see the module docstring), before anything compiles
    (inductor and Triton read the variables when they first compile); returns both variables' values as they now
    stand. Creates nothing: the caches make their folders when they first write."""
    environ = os.environ if environ is None else environ
    added = compile_cache_env(output_dir, environ)
    environ.update(added)
    if environ is os.environ:
        _set_here.update(added)
    return {name: environ[name] for name, _ in CACHE_VARIABLES}


def inductor_cache_dir(environ: Optional[Mapping[str, str]] = None) -> str:
    """Where inductor keeps compiled kernels now: TORCHINDUCTOR_CACHE_DIR, else its default in the temporary folder."""
    environ = os.environ if environ is None else environ
    if environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return os.path.abspath(environ["TORCHINDUCTOR_CACHE_DIR"])
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return default_cache_dir()


def describe_compile_plan(what: str, cache_dir: Optional[str] = None, cold_seconds: Optional[float] = None) -> str:
    """The log line `log_compile_plan` writes."""
    cache_dir = cache_dir or inductor_cache_dir()
    try:
        with os.scandir(cache_dir) as entries:
            warm = any(True for _ in entries)
    except OSError:
        warm = False
    cold = f"about {cold_seconds:.0f} s with an empty cache, " if cold_seconds is not None else ""
    state = "it holds earlier compiles, which are reused" if warm else "it is empty: this run fills it"
    shared = (
        f"{COMPILE_CACHE_ENV} is this shared folder"
        if os.environ.get(COMPILE_CACHE_ENV)
        else f"set {COMPILE_CACHE_ENV} to a folder every node mounts to share it between runs"
    )
    return (
        f"compiling {what} before the first optimizer step: {cold}seconds once cached; compiled kernels are kept in "
        f"{cache_dir} ({state}; {shared})"
    )


def log_compile_plan(what: str, cache_dir: Optional[str] = None, cold_seconds: Optional[float] = None) -> None:
    """Say in the log, before the first step, what is being compiled (`what`, e.g. "flex attention (forward and
    backward)"), about how long it takes on an empty cache (`cold_seconds`, as measured; None: not said), and where
    the compiled kernels are kept (`cache_dir`; None: inductor's cache folder now). Call it from the ranks that log."""
    logger.warning("%s", describe_compile_plan(what, cache_dir, cold_seconds))
