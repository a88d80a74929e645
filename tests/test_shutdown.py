"""The end of a distributed run: every rank tears DeepSpeed and the process group down before the interpreter exits,
so a finished run exits 0 on every rank (a rank that leaves its gloo process group alive can abort at exit,
`terminate called without an active exception`, and the launcher then reports a failure for a saved result).

- Each rank of a 2-rank ZeRO-3 launch, finished or preempted, has no process group left when it exits and its
  DeepSpeed engine was destroyed (an exit probe around finetune.py's main, the launcher's LLMFT_ENTRY).
- A stress run: STRESS_LAUNCHES (20) of the smallest 2-rank ZeRO-3 launch of finetune.py (the tiny model, one step,
  no checkpoint), STRESS_WAVE of them at once so that the two cores are loaded the way a busy node is, each exiting 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, FINETUNE, REPO, argv, launcher_env

pytestmark = pytest.mark.slow

STRESS_LAUNCHES = int(os.environ.get("LLMFT_STRESS_LAUNCHES", "20"))
STRESS_WAVE = 4  # launches at once: 8 ranks on the CPU, the load under which ranks used to abort at exit

# finetune.py's main with a probe: at interpreter exit (after main returned or raised), each rank writes whether a
# process group is still alive and whether the DeepSpeed engine was destroyed.
PROBE = """
import atexit, json, os, sys

import torch
import deepspeed.runtime.engine as engine_module

destroyed = []
original_destroy = engine_module.DeepSpeedEngine.destroy


def destroy(self, *args, **kwargs):
    destroyed.append(True)
    return original_destroy(self, *args, **kwargs)


engine_module.DeepSpeedEngine.destroy = destroy


@atexit.register
def probe():
    path = os.path.join(os.environ["PROBE_OUT"], f"rank{os.environ['RANK']}.json")
    with open(path, "w") as f:
        json.dump({"process_group_alive": torch.distributed.is_initialized(), "engine_destroyed": bool(destroyed)}, f)


sys.path.insert(0, os.environ["LLMFT_REPO"])
from llmft.train import main

main()
"""


def smallest_zero3_launch(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        *argv(
            "{launcher} -m {model} -d {examples} -o {out} --deepspeed zero3 --",
            "--per_device_train_batch_size 1 --max_tokens_per_batch 0 --model_max_length 64",
            "--gradient_checkpointing False --report_to none",
            launcher=FINETUNE / "finetune_lora_ds.sh",
            model=model,
            examples=EXAMPLES,
            out=out,
        ),
        *extra,
    ]


def start(command: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


@pytest.fixture
def probe_entry(tmp_path) -> Path:
    entry = tmp_path / "probed_finetune.py"
    entry.write_text(PROBE)
    (tmp_path / "probe").mkdir()
    return entry


def probes(tmp_path: Path) -> list[dict]:
    return [json.loads((tmp_path / "probe" / f"rank{r}.json").read_text()) for r in range(2)]


def test_a_finished_zero3_run_tears_down_deepspeed_and_the_process_group(tiny_chat_model, tmp_path, probe_entry):
    env = launcher_env(
        GPUS_PER_NODE=2,
        LLMFT_ENTRY=probe_entry,
        PROBE_OUT=tmp_path / "probe",
        LLMFT_REPO=REPO,
        HF_DATASETS_CACHE=tmp_path / "datasets",
    )
    command = smallest_zero3_launch(tiny_chat_model, tmp_path / "out", "--max_steps", "1", "--save_strategy", "no")
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert probes(tmp_path) == [{"process_group_alive": False, "engine_destroyed": True}] * 2
    assert "destroy_process_group() was not called" not in result.stderr


def test_a_preempted_zero3_run_tears_down_too(tiny_chat_model, tmp_path, probe_entry):
    """SIGTERM mid-run: every rank checkpoints, then exits with the preemption status (75), not a signal's."""
    env = launcher_env(
        GPUS_PER_NODE=2,
        LLMFT_ENTRY=probe_entry,
        PROBE_OUT=tmp_path / "probe",
        LLMFT_REPO=REPO,
        HF_DATASETS_CACHE=tmp_path / "datasets",
    )
    out = tmp_path / "out"
    command = smallest_zero3_launch(
        tiny_chat_model, out, "--max_steps", "400", "--save_strategy", "no", "--logging_steps", "1"
    )
    launch = start(command, env)
    deadline = time.monotonic() + 600
    lines = []
    for line in launch.stdout:  # the first logged loss: training has started on both ranks
        lines.append(line)
        if "'loss'" in line or time.monotonic() > deadline:
            break
    os.killpg(launch.pid, signal.SIGTERM)
    rest, _ = launch.communicate(timeout=300)
    output = "".join(lines) + rest
    assert launch.returncode == 75, output[-6000:]
    assert any(p.name.startswith("checkpoint-") for p in out.iterdir()), output[-3000:]
    assert probes(tmp_path) == [{"process_group_alive": False, "engine_destroyed": True}] * 2


def test_stress_finished_zero3_launches_all_exit_0(tiny_chat_model, tmp_path):
    """STRESS_LAUNCHES launches, STRESS_WAVE at a time; any rank aborting at exit fails its launch."""
    failures = []
    for wave in range(0, STRESS_LAUNCHES, STRESS_WAVE):
        running = []
        for i in range(wave, min(wave + STRESS_WAVE, STRESS_LAUNCHES)):
            env = launcher_env(GPUS_PER_NODE=2, HF_DATASETS_CACHE=tmp_path / f"datasets-{i}")
            out = tmp_path / f"out-{i}"
            command = smallest_zero3_launch(tiny_chat_model, out, "--max_steps", "1", "--save_strategy", "no")
            running.append((i, start(command, env)))
        for i, launch in running:
            output, _ = launch.communicate(timeout=900)
            if launch.returncode != 0:
                failures.append((i, launch.returncode, output[-3000:]))
    assert failures == [], f"{len(failures)} of {STRESS_LAUNCHES} launches failed; first: {failures[0]}"
