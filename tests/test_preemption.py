"""Preemption and automatic resume (issue 8, Build): SIGTERM or SIGUSR1 stops a run after the next optimizer step with
one complete checkpoint and exit status EXIT_PREEMPTED; resuming from it ends with the weights of a run that was
never stopped; `--resume_from_checkpoint auto` resumes this same run and refuses a folder holding another.

Exactness: LoRA dropout 0, fp32 on CPU, the same seed: the resumed adapter must equal the uninterrupted one within
atol 1e-6 (one process) and 1e-5 (two ranks, whose gloo all-reduce may sum in another order), the tolerances of the
equivalence tests in test_distributed.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmft.checkpoint_pickles import checkpoint_pickles, pickle_problem
from llmft.errors import EXIT_PREEMPTED, EXIT_USER_ERROR
from llmft.run_folder import RUN_SETTINGS_FILE, checkpoint_problem
from tests.conftest import EXAMPLES, REPO, TINY_LORA, SignalAtStep, argv, finetune, launcher_env, run_launcher

STEPS = 6


# argv() fills {model} and {out}
RUN = (
    TINY_LORA + " --lora_dropout 0 --per_device_train_batch_size 2 --learning_rate 1e-3 --warmup_steps 0"
    f" --max_steps {STEPS} --save_strategy steps --save_steps 100 --logging_steps 1"
)


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


def assert_same_adapter(expected: dict, actual: dict, atol: float) -> None:
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.allclose(actual[key], tensor, atol=atol, rtol=0), (key, (actual[key] - tensor).abs().max())


@pytest.fixture(scope="module")
def uninterrupted(tiny_chat_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    os.environ.setdefault("HF_DATASETS_CACHE", str(out.parent / "datasets"))
    finetune(*argv(RUN, model=tiny_chat_model, out=out))
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)])
def test_signal_stops_at_next_step_with_checkpoint_and_resume_is_exact(
    sig, uninterrupted, tiny_chat_model, tmp_path, datasets_cache
):
    out = tmp_path / "out"
    handler_before = signal.getsignal(sig)
    with pytest.raises(SystemExit) as exit_info:
        finetune(*argv(RUN, model=tiny_chat_model, out=out), callbacks=[SignalAtStep(2, sig)])
    assert exit_info.value.code == EXIT_PREEMPTED
    # the signal came during step 2's callbacks: step 3 is the next boundary, and its checkpoint the only one
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert checkpoint_problem(str(out / "checkpoint-3")) is None
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert not (out / "adapter_model.safetensors").exists()  # no final save of a run that has not finished
    assert signal.getsignal(sig) == handler_before  # given back once the checkpoint is written

    trainer = finetune(*argv(RUN, "--resume_from_checkpoint auto", model=tiny_chat_model, out=out))
    assert trainer.state.global_step == STEPS
    losses = [e["step"] for e in trainer.state.log_history if "loss" in e]
    assert losses == list(range(1, STEPS + 1))  # steps 1-3 from the first run, 4-6 from this one: none twice
    assert_same_adapter(adapter(uninterrupted), adapter(out), atol=1e-6)


def test_a_signal_during_the_last_step_resumes_to_max_steps_not_past_it(
    uninterrupted, tiny_chat_model, tmp_path, datasets_cache
):
    """Before, resuming from the checkpoint of step --max_steps (here mid-epoch) trained one step more."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        finetune(*argv(RUN, model=tiny_chat_model, out=out), callbacks=[SignalAtStep(STEPS - 1)])
    assert exit_info.value.code == EXIT_PREEMPTED
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{STEPS}"]
    assert not (out / "adapter_model.safetensors").exists()

    trainer = finetune(*argv(RUN, "--resume_from_checkpoint True", model=tiny_chat_model, out=out))
    assert trainer.state.global_step == STEPS
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == list(range(1, STEPS + 1))
    assert_same_adapter(adapter(uninterrupted), adapter(out), atol=1e-6)


def test_uninterrupted_run_restores_the_signal_handlers(tiny_chat_model, tmp_path, datasets_cache):
    before = signal.getsignal(signal.SIGUSR1)
    finetune(*argv(RUN, "--max_steps 1", model=tiny_chat_model, out=tmp_path / "out"))
    assert signal.getsignal(signal.SIGUSR1) == before


def test_auto_starts_fresh_in_an_empty_folder_and_records_the_settings(tiny_chat_model, tmp_path, datasets_cache):
    out = tmp_path / "out"
    out.mkdir()
    trainer = finetune(*argv(RUN, "--max_steps 2 --resume_from_checkpoint auto", model=tiny_chat_model, out=out))
    assert trainer.state.global_step == 2
    record = json.loads((out / RUN_SETTINGS_FILE).read_text())
    assert record["settings"]["max_steps"] == 2 and record["settings"]["lora_r"] == 64
    assert record["settings"]["data_path"]["path"] == str(EXAMPLES)
    assert "output_dir" not in record["settings"] and "logging_steps" not in record["settings"]


def test_auto_refuses_a_folder_holding_a_different_run(tiny_chat_model, tmp_path, datasets_cache, capsys):
    out = tmp_path / "out"
    finetune(*argv(RUN, "--max_steps 2 --save_steps 1", model=tiny_chat_model, out=out))
    recorded = (out / RUN_SETTINGS_FILE).read_text()
    # what does not define the run may change: logging, saving
    finetune(
        *argv(
            RUN,
            "--max_steps 2 --save_steps 1 --logging_steps 2 --resume_from_checkpoint auto",
            model=tiny_chat_model,
            out=out,
        )
    )
    for different in ("--learning_rate 2e-3", "--lora_r 8", "--seed 1"):
        with pytest.raises(SystemExit) as exit_info:
            finetune(
                *argv(RUN, "--max_steps 2 --resume_from_checkpoint auto", different, model=tiny_chat_model, out=out)
            )
        assert exit_info.value.code == EXIT_USER_ERROR
        err = capsys.readouterr().err
        name = different.split()[0].removeprefix("--")
        assert "holds a different run" in err and name in err, err
    assert (out / RUN_SETTINGS_FILE).read_text() == recorded  # refused runs record nothing


def test_true_and_a_path_refuse_other_adapter_shapes_as_auto_does(tiny_chat_model, tmp_path, datasets_cache, capsys):
    """Before, `True` (or the checkpoint's path) with another lora_r or lora_target_modules failed with PEFT's
    size-mismatch traceback once the model had loaded. Settings that keep the tensors' shapes may still change."""
    out = tmp_path / "out"
    finetune(*argv(RUN, "--max_steps 2 --save_steps 1", model=tiny_chat_model, out=out))
    recorded = (out / RUN_SETTINGS_FILE).read_text()
    for resume in ("True", str(out / "checkpoint-2")):
        for different in ("--lora_r 8", "--lora_target_modules q_proj v_proj"):
            flags = argv(
                RUN,
                "--max_steps 3 --resume_from_checkpoint {resume}",
                different,
                model=tiny_chat_model,
                out=out,
                resume=resume,
            )
            with pytest.raises(SystemExit) as exit_info:
                finetune(*flags)
            assert exit_info.value.code == EXIT_USER_ERROR
            err = capsys.readouterr().err
            name = different.split()[0].removeprefix("--")
            assert f"--resume_from_checkpoint {resume}: the run in " in err, err
            assert f"was trained with other adapter settings: {name} (" in err and "Traceback" not in err, err
    assert (out / RUN_SETTINGS_FILE).read_text() == recorded
    finetune(
        *argv(RUN, "--max_steps 3 --resume_from_checkpoint True --learning_rate 2e-3", model=tiny_chat_model, out=out)
    )
    assert (out / "adapter_model.safetensors").is_file()


def test_auto_refuses_a_folder_of_unknown_origin(tiny_chat_model, tmp_path, datasets_cache, capsys):
    out = tmp_path / "out"
    (out / "checkpoint-5").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        finetune(*argv(RUN, "--resume_from_checkpoint auto", model=tiny_chat_model, out=out))
    assert exit_info.value.code == EXIT_USER_ERROR
    assert f"no {RUN_SETTINGS_FILE}" in capsys.readouterr().err


def test_a_run_stopped_before_its_first_checkpoint_can_start_again(tiny_chat_model, tmp_path, datasets_cache):
    """All such a run leaves is its settings record: a plain relaunch is not refused as a non-empty folder."""
    out = tmp_path / "out"
    out.mkdir()
    (out / RUN_SETTINGS_FILE).write_text('{"fingerprint": "x", "settings": {}}')
    assert finetune(*argv(RUN, "--max_steps 1", model=tiny_chat_model, out=out)).state.global_step == 1


# --- through llmft.launch.torchrun: the signal reaches the ranks, the status comes back ------------------------------------

SIGNAL_STUB = """\
import json, os, signal, sys, time
from pathlib import Path
from llmft.checkpoint_pickles import checkpoint_pickles, pickle_problem
from llmft.errors import EXIT_PREEMPTED
out = Path(os.environ["STUB_OUT"])
rank = os.environ["RANK"]
def stop(signum, frame):
    (out / f"rank{rank}.signal").write_text(signal.Signals(signum).name)
    sys.exit(EXIT_PREEMPTED)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGUSR1, stop)
(out / f"rank{rank}.ready").write_text(json.dumps(sys.argv[1:]))
time.sleep(120)
"""


def wait_for_ranks(process, folder: Path) -> None:
    deadline = time.monotonic() + 90
    while len(list(folder.glob("rank*.ready"))) < 2:
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.2)
    time.sleep(0.5)  # the ready file is written before the stub sleeps; let torchrun's agent settle too


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_launch_passes_the_signal_to_the_ranks_and_their_status_back(sig, tmp_path, data_file):
    entry = tmp_path / "signal_entry.py"
    entry.write_text(SIGNAL_STUB)
    env = launcher_env(LLMFT_ENTRY=entry, STUB_OUT=tmp_path, GPUS_PER_NODE=2)
    process = subprocess.Popen(
        [str(REPO / "finetune" / "finetune_lora_ds.sh"), "-m", "org/model", "-d", str(data_file)],
        env=env,
        cwd=REPO,
        text=True,
        stderr=subprocess.PIPE,
    )
    wait_for_ranks(process, tmp_path)
    process.send_signal(sig)  # to the launcher only: it exec'd llmft.launch.torchrun
    _, err = process.communicate(timeout=60)
    assert process.returncode == EXIT_PREEMPTED, err
    assert sorted(p.read_text() for p in tmp_path.glob("rank*.signal")) == [sig.name, sig.name]
    assert "llmft: preempted" in err and "Traceback" not in err


@pytest.mark.slow
def test_launch_reports_ranks_the_signal_ended_before_training(tmp_path, data_file):
    """Ranks that a forwarded SIGTERM ends at once (as before training: llmft.preemption.exit_on_signal) make the
    launcher exit 143 after one line, not torchrun's traceback."""
    entry = tmp_path / "signal_entry.py"
    entry.write_text(SIGNAL_STUB.replace("signal.signal(signal.SIGTERM, stop)\n", ""))  # SIGTERM's default
    env = launcher_env(LLMFT_ENTRY=entry, STUB_OUT=tmp_path, GPUS_PER_NODE=2)
    process = subprocess.Popen(
        [str(REPO / "finetune" / "finetune_lora_ds.sh"), "-m", "org/model", "-d", str(data_file)],
        env=env,
        cwd=REPO,
        text=True,
        stderr=subprocess.PIPE,
    )
    wait_for_ranks(process, tmp_path)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "llmft: SIGTERM came before the ranks were training: they stopped without a checkpoint" in err
    assert "Traceback" not in err and not list(tmp_path.glob("rank*.signal"))


FAKE_SRUN = """\
#!/usr/bin/env bash
# srun of one node: drops its options and becomes the task, so that a signal sent to it reaches the task
while [[ $1 == -* ]]; do case $1 in --nodes | --ntasks-per-node) shift 2 ;; *) shift ;; esac; done
export SLURM_NODEID=0
exec "$@"
"""
FAKE_SCONTROL = """\
#!/usr/bin/env bash
case $1 in
    show) echo 127.0.0.1 ;;
    *) echo "$*" >> "$SCONTROL_LOG" ;;
esac
"""


@pytest.mark.slow
def test_slurm_script_passes_the_time_limit_signal_on_requeues_and_resumes(tmp_path, data_file):
    """The batch script under stand-ins for srun and scontrol: Slurm's SIGUSR1 to the batch shell reaches both
    ranks, the job exits 75 and asks to be requeued, and the ranks were started with --resume_from_checkpoint auto."""
    script = (REPO / "finetune" / "slurm_finetune.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@" in script and "#SBATCH --requeue" in script
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    entry = tmp_path / "signal_entry.py"
    entry.write_text(SIGNAL_STUB)
    env = launcher_env(
        LLMFT_ENTRY=entry,
        STUB_OUT=tmp_path,
        GPUS_PER_NODE=2,
        SLURM_JOB_ID=1234,
        SLURM_NNODES=1,
        SLURM_JOB_NODELIST="node1",
        SLURM_SUBMIT_DIR=REPO,
        SCONTROL_LOG=tmp_path / "scontrol.log",
        PATH=f"{bin_dir}:{os.environ['PATH']}",
    )
    process = subprocess.Popen(
        argv(
            "bash {batch_script} {launcher} -m org/model -d {data_file}",
            batch_script=REPO / "finetune" / "slurm_finetune.sbatch",
            launcher=REPO / "finetune" / "finetune_lora_ds.sh",
            data_file=data_file,
        ),
        env=env,
        cwd=REPO,
        text=True,
        stderr=subprocess.PIPE,
    )
    wait_for_ranks(process, tmp_path)
    process.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 does: the batch shell only
    _, err = process.communicate(timeout=60)
    assert process.returncode == EXIT_PREEMPTED, err
    assert sorted(p.read_text() for p in tmp_path.glob("rank*.signal")) == ["SIGUSR1", "SIGUSR1"]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 1234\n"
    for ready in tmp_path.glob("rank*.ready"):
        rank_argv = json.loads(ready.read_text())
        assert rank_argv[rank_argv.index("--resume_from_checkpoint") + 1] == "auto"


# --- two ranks under ZeRO-2, through the launcher ---------------------------------------------------------------

SIGNAL_ONE_RANK_ENTRY = """\
import os, signal, sys
sys.path.insert(0, {repo!r})
from transformers import TrainerCallback
import finetune

class SignalRankOne(TrainerCallback):
    # SIGTERM to rank 1's own process at the end of step 1, as a scheduler or a user's kill would send it
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1 and args.process_index == 1:
            os.kill(os.getpid(), signal.SIGTERM)

finetune.main(sys.argv[1:], callbacks=[SignalRankOne()])
"""


@pytest.mark.slow
def test_two_rank_zero2_run_signalled_on_one_rank_stops_both_and_resumes_exactly(tiny_chat_model, tmp_path):
    from tests.conftest import EQUIVALENCE_RUN, train_with_launcher as train

    batches = dict(batch=1, accumulation=1, max_tokens=0)
    reference, out = tmp_path / "uninterrupted", tmp_path / "preempted"
    result = train("finetune_lora_ds.sh", tiny_chat_model, reference, "zero2", 2, *argv(EQUIVALENCE_RUN, **batches))
    assert result.returncode == 0, result.stderr[-4000:]

    entry = tmp_path / "signal_one_rank.py"
    entry.write_text(SIGNAL_ONE_RANK_ENTRY.format(repo=str(REPO)))
    args = argv(
        "-m {model} -d {data} -o {out} --deepspeed zero2 --",
        EQUIVALENCE_RUN,
        model=tiny_chat_model,
        data=EXAMPLES,
        out=out,
        **batches,
    )
    env = launcher_env(GPUS_PER_NODE=2, HF_DATASETS_CACHE=tmp_path / "datasets", LLMFT_ENTRY=entry)
    result = run_launcher("finetune_lora_ds.sh", *args, env=env, timeout=1200)
    assert result.returncode == EXIT_PREEMPTED, result.stderr[-6000:]
    assert "llmft: preempted" in result.stderr and "Traceback" not in result.stderr
    # rank 1 was asked during step 1; both ranks stopped after step 2, with one complete checkpoint
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert checkpoint_problem(str(out / "checkpoint-2")) is None
    assert len(list((out / "checkpoint-2").glob("global_step2/*optim_states.pt"))) == 2  # both ranks' ZeRO shards
    # what ZeRO-2 pickles passes the resume's check (llmft/checkpoint_pickles.py): the resume below would stop else
    pickles = checkpoint_pickles(str(out / "checkpoint-2"))
    assert sum("global_step2" in p for p in pickles) == 3
    assert [(p, pickle_problem(p)) for p in pickles if pickle_problem(p)] == []
    assert not (out / "adapter_model.safetensors").exists()

    env = launcher_env(GPUS_PER_NODE=2, HF_DATASETS_CACHE=tmp_path / "datasets", RESUME="auto")
    result = run_launcher("finetune_lora_ds.sh", *args, env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-6000:]
    assert f"resuming from {out / 'checkpoint-2'}" in result.stderr
    assert_same_adapter(adapter(reference), adapter(out), atol=1e-5)
    reports = [json.loads((d / "training_report.json").read_text()) for d in (reference, out)]
    assert reports[0]["trained_tokens"] > 0 and reports[0]["world_size"] == 2
    for key in ("tokens_seen", "trained_tokens", "tokens_at_step"):  # both ranks' counts, across the stop
        assert reports[1][key] == reports[0][key], key


@pytest.mark.slow
def test_two_rank_fsdp_lora_run_signalled_stops_with_a_whole_checkpoint_and_resumes_exactly(tiny_chat_model, tmp_path):
    """ds_configs/fsdp.json (FSDP2, FULL_STATE_DICT) on 2 CPU ranks: SIGTERM to rank 1 -> both stop after the next
    step with exit 75; the checkpoint's adapter holds every LoRA tensor whole (not rank 0's slice); the resumed run
    ends with the adapter of a run never stopped, which it could not if either rank had resumed from a partial state."""
    from tests.conftest import EQUIVALENCE_RUN, assert_adapter_trained

    reference, out = tmp_path / "uninterrupted", tmp_path / "preempted"
    args = argv(
        "-m {model} -d {data} -o {out} --fsdp fsdp --",
        EQUIVALENCE_RUN,
        model=tiny_chat_model,
        data=EXAMPLES,
        out=reference,
        batch=1,
        accumulation=1,
        max_tokens=0,
    )
    env = launcher_env(GPUS_PER_NODE=2, HF_DATASETS_CACHE=tmp_path / "datasets")
    result = run_launcher("finetune_lora_ds.sh", *args, env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]

    entry = tmp_path / "signal_one_rank.py"
    entry.write_text(SIGNAL_ONE_RANK_ENTRY.format(repo=str(REPO)))
    args[args.index("-o") + 1] = out
    result = run_launcher("finetune_lora_ds.sh", *args, env={**env, "LLMFT_ENTRY": str(entry)}, timeout=1200)
    assert result.returncode == EXIT_PREEMPTED, result.stderr[-6000:]
    assert "llmft: preempted" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    checkpoint = out / "checkpoint-2"
    assert checkpoint_problem(str(checkpoint)) is None
    assert {"pytorch_model_fsdp.bin", "optimizer.bin", "rng_state_0.pth", "rng_state_1.pth"} <= {
        p.name for p in checkpoint.iterdir()
    }
    assert_adapter_trained(tiny_chat_model, checkpoint)  # each lora_A (r, in) and lora_B (out, r) whole
    assert not (out / "adapter_model.safetensors").exists()

    result = run_launcher("finetune_lora_ds.sh", *args, env={**env, "RESUME": "auto"}, timeout=1200)
    assert result.returncode == 0, result.stderr[-6000:]
    assert f"resuming from {checkpoint}" in result.stderr
    assert_adapter_trained(tiny_chat_model, out)
    assert_same_adapter(adapter(reference), adapter(out), atol=1e-5)


# --- signals outside the training loop ----------------------------------------------------------------------------

SIGNAL_AT_ENTRY = """\
import os, signal, sys
sys.path.insert(0, {repo!r})
import {module} as target
import llmft.train

real = getattr(target, {function!r})

def signalled(*args, **kwargs):
    # SIGTERM to this process from inside {function}, as a scheduler's would come while it runs
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)

setattr(target, {function!r}, signalled)
llmft.train.main(sys.argv[1:])
"""


def run_signalled_in(module: str, function: str, tmp_path, *args) -> subprocess.CompletedProcess:
    """finetune.py's main in a process of its own that gets SIGTERM when `module.function` is called."""
    entry = tmp_path / "signalled_entry.py"
    entry.write_text(SIGNAL_AT_ENTRY.format(repo=str(REPO), module=module, function=function))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    return subprocess.run(
        [sys.executable, str(entry), *map(str, args)], env=env, capture_output=True, text=True, timeout=600
    )


def folder_contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_sigterm_while_the_model_loads_exits_at_once_and_leaves_the_folder_as_it_was(
    tiny_chat_model, tmp_path, datasets_cache
):
    out = tmp_path / "out"
    finetune(*argv(RUN, "--max_steps 2 --save_steps 1", model=tiny_chat_model, out=out))  # a previous run, finished
    before = folder_contents(out)
    # this run would replace it (--overwrite_output_dir), but is stopped while its model loads
    result = run_signalled_in(
        "llmft.train",
        "build_model",
        tmp_path,
        *argv(RUN, "--max_steps 4 --overwrite_output_dir True", model=tiny_chat_model, out=out),
    )
    assert result.returncode == -signal.SIGTERM, result.stderr[-3000:]  # what a shell reports as 143
    assert "SIGTERM outside training (no step to finish): exiting now with status 143" in result.stderr
    assert "Traceback" not in result.stderr
    assert folder_contents(out) == before


@pytest.mark.slow
def test_sigterm_during_the_final_save_lets_it_finish_whole(tiny_chat_model, tmp_path, datasets_cache):
    out = tmp_path / "out"
    # the signal comes in the middle of the staged save: the adapter is in the staging folder, not yet in place
    result = run_signalled_in(
        "llmft.saving", "check_adapter_complete", tmp_path, *argv(RUN, "--max_steps 2", model=tiny_chat_model, out=out)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SIGTERM during the final save: finishing it first" in result.stderr
    assert "the final save is complete; stopping as SIGTERM asked" in result.stderr
    assert not (out / ".llmft-saving").exists()
    from peft import AutoPeftModelForCausalLM

    AutoPeftModelForCausalLM.from_pretrained(out)  # whole: it loads
    assert json.loads((out / "llmft_run.json").read_text())["mode"] == "lora"
