"""What a run writes is readable by the team: every file follows the umask (0644 under 022), the weights included.

safetensors (0.8) writes through a temporary file created 0600 and renamed into place, so before the fix the adapter,
merged and checkpoint weights were private to their writer while every other file was 0644. The merge output is
tested in test_merge_lora.py; here a LoRA run's final save and checkpoints, and the record of its base.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from transformers import TrainerCallback

from llmft.saving import RUN_FILE, FollowUmaskCallback, base_fingerprint
from tests.conftest import argv, chat_record, write_records

UMASK = 0o022


@pytest.fixture
def umask_022():
    old = os.umask(UMASK)
    yield
    os.umask(old)


# A short LoRA run that checkpoints every step; argv() fills {model}, {data} and {out}
LORA_RUN = (
    "--model_name_or_path {model} --data_path {data} --output_dir {out} --use_lora True --lora_r 4 --max_steps 2"
    " --per_device_train_batch_size 2 --save_strategy steps --save_steps 1 --seed 0 --report_to none --use_cpu True"
)


@pytest.fixture
def data(tmp_path):
    records = [chat_record(f"Question {i}?", f"Answer {i}.") for i in range(4)]
    return write_records(tmp_path / "train.jsonl", records, jsonl=True)


def modes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): oct(p.stat().st_mode & 0o777) for p in sorted(root.rglob("*"))}


def test_adapter_and_checkpoints_follow_the_umask(tiny_chat_model, data, tmp_path, run_finetune, umask_022):
    out = tmp_path / "out"
    run_finetune(*argv(LORA_RUN, model=tiny_chat_model, data=data, out=out))
    found = modes(out)
    weights = [name for name in found if name.endswith(".safetensors")]
    assert "adapter_model.safetensors" in weights and "checkpoint-1/adapter_model.safetensors" in weights
    files = {name: mode for name, mode in found.items() if (out / name).is_file()}
    folders = {name: mode for name, mode in found.items() if (out / name).is_dir()}
    assert set(files.values()) == {"0o644"}, files
    assert set(folders.values()) == {"0o755"}, folders


def test_run_records_the_fingerprint_of_its_base(tiny_chat_model, data, tmp_path, run_finetune):
    out = tmp_path / "out"
    run_finetune(*argv(LORA_RUN, "--save_strategy no", model=tiny_chat_model, data=data, out=out))
    run = json.loads((out / RUN_FILE).read_text())
    assert run["base_fingerprint"] == base_fingerprint(tiny_chat_model)
    assert run["base_fingerprint"].startswith("sha256-all:")


class CheckpointModes(TrainerCallback):
    """Records the modes of each checkpoint's files at the moment the Trainer reports it saved."""

    def __init__(self):
        self.seen = {}

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.seen[checkpoint.name] = {n: m for n, m in modes(checkpoint).items() if (checkpoint / n).is_file()}


def train_with(callbacks, *flags):
    import finetune

    return finetune.main([str(f) for f in flags], callbacks=callbacks)


def test_follow_umask_callback_fixes_each_checkpoint_as_it_is_saved(
    tiny_chat_model, data, tmp_path, datasets_cache, umask_022
):
    probe = CheckpointModes()
    train_with([FollowUmaskCallback(), probe], *argv(LORA_RUN, model=tiny_chat_model, data=data, out=tmp_path / "out"))
    assert set(probe.seen) == {"checkpoint-1", "checkpoint-2"}
    for checkpoint, files in probe.seen.items():
        assert "adapter_model.safetensors" in files, checkpoint
        assert set(files.values()) == {"0o644"}, (checkpoint, files)


def test_checkpoints_are_readable_while_the_run_goes_on(tiny_chat_model, data, tmp_path, datasets_cache, umask_022):
    probe = CheckpointModes()
    train_with([probe], *argv(LORA_RUN, model=tiny_chat_model, data=data, out=tmp_path / "out"))
    assert all(set(files.values()) == {"0o644"} for files in probe.seen.values()), probe.seen
