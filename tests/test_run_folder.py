"""The output folder across runs: --overwrite_output_dir replaces the previous run, and resume skips checkpoints whose
save was cut short (issue 8, bugs 2 and 3). Each test fails on the code before the fix: overwrite deleted nothing, so
resume continued the old run and a reload mixed old full weights with new adapter files; resume took the newest
checkpoint-* folder whatever it held, and failed on every retry."""

from __future__ import annotations

import json
import logging
import shlex

import pytest

from llmft.errors import EXIT_USER_ERROR
from tests.conftest import EXAMPLES, argv


# A full fine-tune of the tiny model on the bundled examples; argv() fills {model} and {out}
RUN = (
    f"--model_name_or_path {{model}} --data_path {shlex.quote(str(EXAMPLES))} --output_dir {{out}} --use_cpu True"
    " --model_max_length 128 --per_device_train_batch_size 4 --learning_rate 1e-3 --report_to none --seed 0"
    " --logging_steps 1"
)


def test_overwrite_replaces_the_previous_run(tiny_chat_model, tmp_path, run_finetune):
    out = tmp_path / "out"
    # a full fine-tune with checkpoints, then LoRA over it
    run_finetune(*argv(RUN, "--max_steps 2 --save_steps 1", model=tiny_chat_model, out=out))
    assert (out / "model.safetensors").exists() and (out / "checkpoint-2").is_dir()
    (out / "notes.txt").write_text("mine")  # not something a run writes: stays
    run_finetune(
        *argv(
            RUN,
            "--max_steps 1 --save_strategy no --use_lora True --overwrite_output_dir True",
            model=tiny_chat_model,
            out=out,
        )
    )
    names = {p.name for p in out.iterdir()}
    assert not any(n.startswith("checkpoint-") for n in names)
    assert "model.safetensors" not in names and "config.json" not in names
    assert {"adapter_model.safetensors", "adapter_config.json", "notes.txt"} <= names
    assert json.loads((out / "llmft_run.json").read_text())["mode"] == "lora"

    from peft import AutoPeftModelForCausalLM

    AutoPeftModelForCausalLM.from_pretrained(out)  # the new run's adapter, over the recorded base


def test_overwrite_and_resume_together_are_refused(tiny_chat_model, tmp_path, run_finetune, capsys):
    out = tmp_path / "out"
    run_finetune(*argv(RUN, "--max_steps 1 --save_steps 1", model=tiny_chat_model, out=out))
    with pytest.raises(SystemExit) as exit_info:
        run_finetune(
            *argv(
                RUN,
                "--max_steps 2 --overwrite_output_dir True --resume_from_checkpoint True",
                model=tiny_chat_model,
                out=out,
            )
        )
    assert exit_info.value.code == EXIT_USER_ERROR
    assert "choose one" in capsys.readouterr().err
    assert (out / "checkpoint-1" / "trainer_state.json").exists()  # nothing was removed


def test_resume_skips_checkpoints_cut_short(tiny_chat_model, tmp_path, run_finetune, caplog):
    out = tmp_path / "out"
    run_finetune(*argv(RUN, "--max_steps 4 --save_steps 2 --use_lora True", model=tiny_chat_model, out=out))
    # what kill -9 leaves: an empty checkpoint folder, and one whose optimizer was written but not its state
    (out / "checkpoint-6").mkdir()
    (out / "checkpoint-8").mkdir()
    (out / "checkpoint-8" / "optimizer.pt").write_bytes(b"\0" * 64)
    with caplog.at_level(logging.WARNING):
        trainer = run_finetune(
            *argv(
                RUN,
                "--max_steps 6 --save_steps 2 --use_lora True --resume_from_checkpoint True",
                model=tiny_chat_model,
                out=out,
            )
        )
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
        run_finetune(*argv(RUN, "--max_steps 4 --resume_from_checkpoint True", model=tiny_chat_model, out=out))
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
                        if (
                            entry.name.startswith("checkpoint-")
                            and entry.name != "checkpoint-1"
                            and not (entry / "trainer_state.json").exists()
                        ):
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
def test_kill_9_during_a_checkpoint_save_resumes_from_the_previous_complete_one(
    tiny_chat_model, tmp_path, run_finetune, caplog
):
    """kill -9 mid-save (a checkpoint folder whose trainer_state.json was never written), then resume: the run picks
    the checkpoint before it, says so, and ends with the weights of a run that was never killed."""
    import os
    import sys

    import torch
    from safetensors.torch import load_file

    from tests.conftest import REPO

    run = RUN + " --max_steps 12 --save_steps 1 --lr_scheduler_type constant --warmup_steps 0 --max_tokens_per_batch 0"
    reference, out = tmp_path / "uninterrupted", tmp_path / "killed"
    run_finetune(*argv(run, model=tiny_chat_model, out=reference))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    command = [sys.executable, str(REPO / "finetune.py"), *argv(run, model=tiny_chat_model, out=out)]
    cut = kill_during_a_checkpoint_save(command, out, env)
    step = int(cut.split("-")[1])

    with caplog.at_level(logging.WARNING):
        trainer = run_finetune(*argv(run, "--resume_from_checkpoint True", model=tiny_chat_model, out=out))
    assert f"not resuming from {out / cut}: no trainer_state.json" in caplog.text
    assert f"resuming from {out / f'checkpoint-{step - 1}'}" in caplog.text
    assert trainer.state.global_step == 12
    expected, actual = load_file(str(reference / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.allclose(actual[key], tensor, atol=1e-6), key


def deepspeed_checkpoint(path, ranks: int = 2, step: int = 2):
    """A checkpoint folder laid out as the Trainer and DeepSpeed ZeRO-2 write it for `ranks` ranks, each file whole."""
    import torch
    from safetensors.torch import save_file

    tag = path / f"global_step{step}"
    tag.mkdir(parents=True)
    save_file({"base_model.model.lora_A.weight": torch.zeros(2, 2)}, str(path / "adapter_model.safetensors"))
    torch.save({"module": None}, tag / "mp_rank_00_model_states.pt")
    for rank in range(ranks):
        torch.save({"optimizer_state_dict": {}}, tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        torch.save({"cpu": torch.zeros(2)}, path / f"rng_state_{rank}.pth")
    torch.save({}, path / "scheduler.pt")
    (path / "latest").write_text(tag.name)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


@pytest.mark.parametrize(
    "breakage, problem",
    [
        # rank 1 was killed before its RNG state was on disk; rank 0 had written trainer_state.json already
        ("rm rng_state_1.pth", "rng_state_1.pth is missing"),
        ("cut rng_state_1.pth", "rng_state_1.pth is cut short"),
        (
            "cut global_step2/zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "global_step2/zero_pp_rank_1_mp_rank_00_optim_states.pt is cut short",
        ),
        (
            "rm global_step2/zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "global_step2 holds the optimizer shards of ranks [0], beside the RNG states of 2 ranks",
        ),
        ("rm latest", "DeepSpeed's latest file is missing"),
        ("latest global_step9", "DeepSpeed's latest names 'global_step9', which is not there"),
        ("rm global_step2/mp_rank_00_model_states.pt", "global_step2 holds no model states"),
    ],
)
def test_an_incomplete_deepspeed_checkpoint_is_not_resumed_from(breakage, problem, tmp_path):
    from llmft.run_folder import checkpoint_problem, checkpoints

    out = tmp_path / "out"
    deepspeed_checkpoint(out / "checkpoint-1", step=1)
    broken = deepspeed_checkpoint(out / "checkpoint-2")
    assert checkpoint_problem(str(broken)) is None
    action, name = breakage.split(" ")
    if action == "rm":
        (broken / name).unlink()
    elif action == "cut":
        data = (broken / name).read_bytes()
        (broken / name).write_bytes(data[: len(data) // 2])
    else:
        (broken / "latest").write_text(name)
    assert checkpoint_problem(str(broken)).startswith(problem), checkpoint_problem(str(broken))
    assert checkpoints(str(out)) == ([str(out / "checkpoint-1")], [(str(broken), checkpoint_problem(str(broken)))])


def kill_9_mid_training(command: list[str], out, env, seed: int, window: float, attempts: int = 4) -> float:
    """Start `command` (a launcher: the agent and its ranks) and, a seeded random time after its first checkpoint is
    complete, SIGKILL every process of it at once, as a lost node or the OOM killer of a job's cgroup would; retried
    with a shorter window until a kill lands before the final save. Returns the delay of that kill."""
    import random
    import shutil
    import signal
    import subprocess
    import time

    import psutil

    generator = random.Random(seed)
    for _ in range(attempts):
        shutil.rmtree(out, ignore_errors=True)
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 600
            while not (out / "checkpoint-1" / "trainer_state.json").exists():
                assert process.poll() is None and time.monotonic() < deadline, "the run ended before step 1's save"
                time.sleep(0.05)
            delay = generator.uniform(0, window)
            time.sleep(delay)
            # the ranks run in sessions of their own (torchrun's start_new_session): a process group does not reach
            # them, so every process of the tree goes, the ranks first
            tree = psutil.Process(process.pid).children(recursive=True)
            for victim in [*tree, psutil.Process(process.pid)]:
                try:
                    victim.send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(tree, timeout=30)
            process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        if not (out / "adapter_model.safetensors").exists():
            return delay
        window /= 2
    pytest.fail(f"no kill landed before the final save in {attempts} runs")


@pytest.mark.slow
def test_kill_9_of_two_zero2_ranks_at_a_random_moment_then_resume_ends_as_an_uninterrupted_run(
    tiny_chat_model, tmp_path
):
    """2 CPU ranks under ZeRO-2 LoRA, a checkpoint every step, every process SIGKILLed at a random moment of training:
    relaunched with RESUME=auto, the run skips whatever checkpoint the kill cut short and ends with the adapter of a
    run never killed (atol 1e-5, as the two-rank equivalence tests)."""
    import time

    import torch
    from safetensors.torch import load_file

    from tests.conftest import EQUIVALENCE_RUN, FINETUNE, launcher_env, run_launcher, train_with_launcher

    batches = dict(batch=1, accumulation=1, max_tokens=0)
    run_flags = argv(EQUIVALENCE_RUN, "--max_steps 8 --save_steps 1 --save_total_limit 3", **batches)
    reference, out = tmp_path / "uninterrupted", tmp_path / "killed"
    started = time.monotonic()
    result = train_with_launcher("finetune_lora_ds.sh", tiny_chat_model, reference, "zero2", 2, *run_flags)
    assert result.returncode == 0, result.stderr[-4000:]
    window = time.monotonic() - started  # the whole run, start-up included: the training part is shorter

    args = (
        argv("-m {model} -d {data} -o {out} --deepspeed zero2 --", model=tiny_chat_model, data=EXAMPLES, out=out)
        + run_flags
    )
    env = launcher_env(GPUS_PER_NODE=2, HF_DATASETS_CACHE=tmp_path / "datasets")
    kill_9_mid_training([str(FINETUNE / "finetune_lora_ds.sh"), *map(str, args)], out, env, seed=8, window=window)
    killed_at = sorted(p.name for p in out.glob("checkpoint-*"))

    env = launcher_env(GPUS_PER_NODE=2, HF_DATASETS_CACHE=tmp_path / "datasets", RESUME="auto")
    result = run_launcher("finetune_lora_ds.sh", *args, env=env, timeout=1200)
    assert result.returncode == 0, (killed_at, result.stderr[-6000:])
    assert "resuming from" in result.stderr, (killed_at, result.stderr[-4000:])
    expected, actual = (
        load_file(str(reference / "adapter_model.safetensors")),
        load_file(str(out / "adapter_model.safetensors")),
    )
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.allclose(actual[key], tensor, atol=1e-5, rtol=0), (killed_at, key)
