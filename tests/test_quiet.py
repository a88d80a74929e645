"""Known third-party noise (llmft/quiet.py) stays out of the terminal of `llmft chat --help` and of a training run,
while the warnings llmft emits, and the libraries' other messages on the same loggers, still show."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from enum import Enum

import pytest

from tests.conftest import EXAMPLES, REPO, argv

# One line of each known noise, as it reads in a terminal without llmft's filters.
NOISE = {
    "bitsandbytes": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "torchao pytree": "is an Enum subclass and is now natively supported by torch.compile",
    "GPTQModel banner": "GPT-QModel   :",
    "GPTQModel GIL notice": "Python GIL is enabled",
    "transformers deprecation": "`is_gradient_checkpointing` is deprecated",
}


def run(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def noise_without_llmft() -> str:
    """What the same libraries print when imported without llmft: the lines the filters must find to drop."""
    proc = run("-c", "import transformers.training_args, peft, gptqmodel")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def assert_no_known_noise(output: str, baseline: str) -> None:
    if not any(line in baseline for line in NOISE.values()):
        pytest.skip("these libraries print none of the known noise on this machine")
    leaked = [name for name, line in NOISE.items() if line in output]
    assert leaked == [], output[-4000:]


@pytest.mark.slow
def test_chat_help_shows_no_known_noise(noise_without_llmft):
    proc = run("-m", "llmft.cli", "chat", "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage: llmft chat")
    assert_no_known_noise(proc.stdout + proc.stderr, noise_without_llmft)
    assert proc.stderr == ""


@pytest.mark.slow
def test_training_run_shows_llmfts_warnings_and_no_known_noise(noise_without_llmft, tiny_chat_model, tmp_path):
    proc = run(
        "finetune.py",
        *argv(
            "--model_name_or_path {model} --data_path {examples} --output_dir {out} --use_lora True",
            "--max_steps 1 --use_cpu True --report_to none --save_strategy no --model_max_length 4096",
            model=tiny_chat_model,
            examples=EXAMPLES,
            out=tmp_path / "out",
        ),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_no_known_noise(proc.stdout + proc.stderr, noise_without_llmft)
    # llmft's own warnings, through logging and straight to stderr, still reach the terminal
    assert (
        "WARNING llmft.plan: plan: lora, float32; sharding none; activation checkpointing off; attention sdpa"
        in proc.stderr
    )
    assert "--model_max_length 4096 is above the model's context of 2048 tokens" in proc.stderr
    assert "GPTQModel" not in proc.stdout and "gptqmodel" not in proc.stdout.lower()


@pytest.mark.parametrize(
    "logger, message, args, shown",
    [
        (
            "bitsandbytes.backends.cpu.ops",
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s",
            ("x",),
            False,
        ),
        ("bitsandbytes.backends.cpu.ops", "Failed to load the CUDA library: %s", ("x",), True),  # another message
        (
            "torch.utils._pytree",
            "%s is an Enum subclass and is now natively supported by torch.compile as ...",
            (Enum("KernelPreference", "AUTO", module="torchao.quantization"),),
            False,
        ),
        (
            "torch.utils._pytree",
            "%s is an Enum subclass and is now natively supported by torch.compile as ...",
            (Enum("Mine", "A", module="mypackage"),),
            True,
        ),  # the same deprecation, not torchao's: shown
        ("torch.utils._pytree", "something else entirely %s", ("x",), True),
    ],
)
def test_filters_drop_only_the_known_message(logger, message, args, shown):
    import llmft  # noqa: F401  (installs the filters)

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    library = logging.getLogger(logger)
    library.addHandler(handler)
    try:
        library.warning(message, *args)
    finally:
        library.removeHandler(handler)
    assert len(records) == (1 if shown else 0)


@pytest.mark.slow
def test_lora_does_not_import_gptqmodel_and_a_gptq_check_afterwards_still_finds_it(tiny_chat_model):
    """Run in a fresh process: in this one another test may have imported GPTQModel already."""
    code = f"""
import sys
from peft import LoraConfig, get_peft_model
from peft.import_utils import is_gptqmodel_available
from transformers import AutoModelForCausalLM
from llmft.quiet import without_unused_gptqmodel

model = AutoModelForCausalLM.from_pretrained({str(tiny_chat_model)!r})
with without_unused_gptqmodel():
    model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
assert "gptqmodel" not in sys.modules, "imported"
assert any(".lora_A." in name for name, _ in model.named_parameters())
assert is_gptqmodel_available(), "PEFT kept the pretended answer"
import transformers.utils
assert transformers.utils.is_gptqmodel_available(), "transformers kept the pretended answer"
import gptqmodel
print("ok")
"""
    proc = run("-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


@pytest.mark.slow
def test_loading_an_adapter_for_chat_does_not_import_gptqmodel(tiny_chat_model, tmp_path):
    """`llmft chat` / `merge` on a LoRA folder: PEFT's load path asks about GPTQModel layers too."""
    code = f"""
import sys
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from llmft.quiet import without_unused_gptqmodel

model = AutoModelForCausalLM.from_pretrained({str(tiny_chat_model)!r})
with without_unused_gptqmodel():
    get_peft_model(model, LoraConfig(r=2, target_modules="all-linear")).save_pretrained({str(tmp_path / "adapter")!r})
assert "gptqmodel" not in sys.modules
from llmft.inference import load_for_inference
model, tokenizer = load_for_inference({str(tmp_path / "adapter")!r}, device="cpu")
assert "gptqmodel" not in sys.modules, "imported"
assert any(".lora_A." in name for name, _ in model.named_parameters())
print("ok")
"""
    proc = run("-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


# What GPTQModel prints of its own while `llmft quantize` runs: informational, off the screen unless --verbose.
GPTQMODEL_INFO = {
    "timing table": "+-------------+",
    "saved config": "Saved Quantize Config",
    "saved file list": "Files in directory:",
    "banner": "GPT-QModel   :",
    "GIL notice": "Python GIL is enabled",
    "its tokenizer helper": "Tokenicer: Auto fixed",
    "its kernel lookup on a machine without a GPU": "No CUDA runtime is found",
}


@pytest.mark.slow
@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_quantize_keeps_gptqmodels_info_off_the_screen_unless_verbose(verbose, tiny_chat_model, tmp_path):
    proc = run(
        *argv(
            "-m llmft.cli quantize --model_name_or_path {model} --data_path {examples} --output_dir {gptq}",
            "--num_samples 8 --eval_samples 4",
            model=tiny_chat_model,
            examples=EXAMPLES,
            gptq=tmp_path / "gptq",
        ),
        *(["--verbose"] if verbose else []),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    screen = proc.stdout + proc.stderr
    shown = {name for name, line in GPTQMODEL_INFO.items() if line in screen}
    if verbose:  # the baseline: GPTQModel does print these, so their absence below means something
        assert {"timing table", "saved config", "saved file list"} <= shown, screen[-4000:]
    else:
        assert shown == set(), screen[-4000:]
        assert not any(line.startswith("INFO ") for line in screen.splitlines())
    # llmft's own lines: the result and the quality report, on stdout
    assert proc.stdout.startswith(f"quantized {tiny_chat_model} -> {tmp_path / 'gptq'} in ")
    assert "loss increase" in proc.stdout
