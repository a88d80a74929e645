"""The output folder across runs: --overwrite_output_dir replaces the previous run, and resume skips checkpoints whose
save was cut short (issue 8, bugs 2 and 3). Each test fails on the code before the fix: overwrite deleted nothing, so
resume continued the old run and a reload mixed old full weights with new adapter files; resume took the newest
checkpoint-* folder whatever it held, and failed on every retry."""

from __future__ import annotations

import json
import logging

import pytest

from llmft.errors import EXIT_USER_ERROR
from tests.conftest import EXAMPLES


def flags(model, out, *extra):
    return ["--model_name_or_path", model, "--data_path", EXAMPLES, "--output_dir", out, "--use_cpu", "True",
            "--model_max_length", "128", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
            "--report_to", "none", "--seed", "0", "--logging_steps", "1", *extra]


def test_overwrite_replaces_the_previous_run(tiny_chat_model, tmp_path, run_finetune):
    out = tmp_path / "out"
    # a full fine-tune with checkpoints, then LoRA over it
    run_finetune(*flags(tiny_chat_model, out, "--max_steps", "2", "--save_steps", "1"))
    assert (out / "model.safetensors").exists() and (out / "checkpoint-2").is_dir()
    (out / "notes.txt").write_text("mine")  # not something a run writes: stays
    run_finetune(*flags(tiny_chat_model, out, "--max_steps", "1", "--save_strategy", "no", "--use_lora", "True",
                        "--overwrite_output_dir", "True"))
    names = {p.name for p in out.iterdir()}
    assert not any(n.startswith("checkpoint-") for n in names)
    assert "model.safetensors" not in names and "config.json" not in names
    assert {"adapter_model.safetensors", "adapter_config.json", "notes.txt"} <= names
    assert json.loads((out / "llmft_run.json").read_text())["mode"] == "lora"

    from peft import AutoPeftModelForCausalLM

    AutoPeftModelForCausalLM.from_pretrained(out)  # the new run's adapter, over the recorded base


def test_overwrite_and_resume_together_are_refused(tiny_chat_model, tmp_path, run_finetune, capsys):
    out = tmp_path / "out"
    run_finetune(*flags(tiny_chat_model, out, "--max_steps", "1", "--save_steps", "1"))
    with pytest.raises(SystemExit) as exit_info:
        run_finetune(*flags(tiny_chat_model, out, "--max_steps", "2", "--overwrite_output_dir", "True",
                            "--resume_from_checkpoint", "True"))
    assert exit_info.value.code == EXIT_USER_ERROR
    assert "choose one" in capsys.readouterr().err
    assert (out / "checkpoint-1" / "trainer_state.json").exists()  # nothing was removed


def test_resume_skips_checkpoints_cut_short(tiny_chat_model, tmp_path, run_finetune, caplog):
    out = tmp_path / "out"
    run_finetune(*flags(tiny_chat_model, out, "--max_steps", "4", "--save_steps", "2", "--use_lora", "True"))
    # what kill -9 leaves: an empty checkpoint folder, and one whose optimizer was written but not its state
    (out / "checkpoint-6").mkdir()
    (out / "checkpoint-8").mkdir()
    (out / "checkpoint-8" / "optimizer.pt").write_bytes(b"\0" * 64)
    with caplog.at_level(logging.WARNING):
        trainer = run_finetune(*flags(tiny_chat_model, out, "--max_steps", "6", "--save_steps", "2",
                                      "--use_lora", "True", "--resume_from_checkpoint", "True"))
    assert trainer.state.global_step == 6
    messages = caplog.text
    assert f"resuming from {out / 'checkpoint-4'}" in messages
    assert "checkpoint-6: no trainer_state.json" in messages.replace(f"{out}/", "")
    assert "checkpoint-8: no trainer_state.json" in messages.replace(f"{out}/", "")
    # the run went on from step 4: its state holds the losses of steps 1-4 from the first run and 5-6 from this one
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e][-2:] == [5, 6]


def test_resume_with_only_incomplete_checkpoints_names_them(tiny_chat_model, tmp_path, run_finetune, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint-3").mkdir()
    (out / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": 3, "log_hi')  # cut mid-write
    with pytest.raises(SystemExit) as exit_info:
        run_finetune(*flags(tiny_chat_model, out, "--max_steps", "4", "--resume_from_checkpoint", "True"))
    assert exit_info.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "no complete checkpoint-*" in err and "checkpoint-3 is incomplete: trainer_state.json is cut short" in err


def kill_during_a_checkpoint_save(command: list[str], out, env, attempts: int = 5) -> str:
    """Run `command` and SIGKILL it the moment a checkpoint folder exists whose save has not finished (no
    trainer_state.json yet, which the Trainer writes last); retried until such a kill happens. Returns the name of
    the checkpoint cut short."""
    import shutil
    import subprocess
    import time

    for _ in range(attempts):
        shutil.rmtree(out, ignore_errors=True)
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while process.poll() is None:
                if out.is_dir():
                    for entry in out.iterdir():
                        if entry.name.startswith("checkpoint-") and entry.name != "checkpoint-1" \
                                and not (entry / "trainer_state.json").exists():
                            process.kill()
                            process.wait()
                            if not (entry / "trainer_state.json").exists():
                                return entry.name
                time.sleep(0.001)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    pytest.fail(f"no kill landed inside a checkpoint save in {attempts} runs")


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_save_resumes_from_the_previous_complete_one(tiny_chat_model, tmp_path,
                                                                                 run_finetune, caplog):
    """kill -9 mid-save (a checkpoint folder whose trainer_state.json was never written), then resume: the run picks
    the checkpoint before it, says so, and ends with the weights of a run that was never killed."""
    import os
    import sys

    import torch
    from safetensors.torch import load_file

    from tests.conftest import REPO

    steps = ["--max_steps", "12", "--save_steps", "1", "--lr_scheduler_type", "constant", "--warmup_steps", "0",
             "--max_tokens_per_batch", "0"]
    reference, out = tmp_path / "uninterrupted", tmp_path / "killed"
    run_finetune(*flags(tiny_chat_model, reference, *steps))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    command = [sys.executable, str(REPO / "finetune.py"), *map(str, flags(tiny_chat_model, out, *steps))]
    cut = kill_during_a_checkpoint_save(command, out, env)
    step = int(cut.split("-")[1])

    with caplog.at_level(logging.WARNING):
        trainer = run_finetune(*flags(tiny_chat_model, out, *steps, "--resume_from_checkpoint", "True"))
    assert f"not resuming from {out / cut}: no trainer_state.json" in caplog.text
    assert f"resuming from {out / f'checkpoint-{step - 1}'}" in caplog.text
    assert trainer.state.global_step == 12
    expected, actual = load_file(str(reference / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.allclose(actual[key], tensor, atol=1e-6), key
