"""The output folder never costs the user an input or a file of theirs (issue 16, items 1, 2, 6, 7, 14 and the 0600
files of item 20; llmft/run_folder.py). Each test fails on the code before the fix: an output folder equal to the
model folder or the data's folder was emptied by --overwrite_output_dir (a name match took model_train.json, runs/,
config.json, vocab.json), the mode fix-up went through a checkpoint-* link, two runs shared a folder, a full disk
ended in a traceback, and make-tiny-model wrote its weights 0600."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch
from transformers import TrainerCallback

from llmft.errors import EXIT_USER_ERROR, LlmftError
from llmft.run_folder import (
    LOCK_FILE,
    WRITTEN_FILE,
    clear_previous_run,
    disk_full_is_user_error,
    follow_umask,
    locked_output_dir,
    record_written,
)
from tests.conftest import EXAMPLES, REPO, TINY_LORA, argv, finetune


@pytest.fixture(autouse=True)
def private_datasets_cache(datasets_cache):
    """The runs here tokenize into the session's private cache, as run_finetune's do."""


# argv() fills {model} and {out}
RUN = TINY_LORA + " --per_device_train_batch_size 2"


def folder_contents(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, *args) -> str:
    """finetune.py in this process with these flags: it must stop with a user error; returns that error."""
    with pytest.raises(SystemExit) as exit_info:
        finetune(*args)
    assert exit_info.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# --- item 1: the model folder as the output -------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["same path", "link to it", "parent of it"])
def test_an_output_dir_that_is_or_holds_the_model_is_refused_before_anything_loads(
    how, tiny_chat_model, tmp_path, capsys, monkeypatch
):
    model = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_chat_model, model)
    before = folder_contents(tmp_path / "models")
    out = {"same path": model, "link to it": tmp_path / "link", "parent of it": tmp_path / "models"}[how]
    if how == "link to it":
        out.symlink_to(model)
    import llmft.train

    monkeypatch.setattr(llmft.train, "load_training_tokenizer", lambda *a: pytest.fail("loaded before refusing"))
    err = refused(capsys, *argv(RUN, "--max_steps 1 --overwrite_output_dir True", model=model, out=out))
    relation = "contains" if how == "parent of it" else "is"
    assert f"--output_dir {out} {relation} --model_name_or_path {model}" in err, err
    assert folder_contents(tmp_path / "models") == before


# --- item 2: the data's folder as the output, and what overwrite removes -------------------------------------------


def data_folder(tmp_path):
    """A folder of the user's: training data whose name looks like a run's file, TensorBoard logs of other work, a
    vocabulary and a config."""
    folder = tmp_path / "project"
    folder.mkdir()
    shutil.copy(EXAMPLES, folder / "model_train.json")
    (folder / "runs" / "other").mkdir(parents=True)
    (folder / "runs" / "other" / "events.out").write_text("logs of other work")
    (folder / "vocab.json").write_text('{"a": 0}')
    (folder / "config.json").write_text("{}")
    return folder


def test_the_data_folder_as_output_is_refused(tiny_chat_model, tmp_path, capsys):
    folder = data_folder(tmp_path)
    before = folder_contents(folder)
    args = argv(RUN, "--max_steps 1 --overwrite_output_dir True", model=tiny_chat_model, out=folder)
    args[args.index("--data_path") + 1] = folder / "model_train.json"
    err = refused(capsys, *args)
    assert f"--output_dir {folder} contains --data_path {folder / 'model_train.json'}" in err, err
    assert folder_contents(folder) == before


def test_a_config_file_inside_the_output_is_refused(tiny_chat_model, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    config = out / "run.yaml"
    config.write_text(f"model_name_or_path: {tiny_chat_model}\ndata_path: {EXAMPLES}\noutput_dir: {out}\n")
    err = refused(capsys, config, *argv(RUN, "--max_steps 1", model=tiny_chat_model, out=out)[6:])  # after the 3 paths
    assert f"--output_dir {out} contains the config file {config}" in err, err
    assert config.exists()


def test_overwrite_removes_what_the_previous_run_recorded_and_nothing_else(tiny_chat_model, tmp_path):
    out = tmp_path / "out"
    finetune(*argv(RUN, "--max_steps 2 --save_steps 1", model=tiny_chat_model, out=out))
    recorded = json.loads((out / WRITTEN_FILE).read_text())["written"]
    assert {"checkpoint-1", "checkpoint-2", "adapter_model.safetensors", "llmft_run_settings.json"} <= set(recorded)
    # files of the user's put there after the run, named as a run's files are (model*.json, runs/)
    shutil.copy(EXAMPLES, out / "model_train.json")
    (out / "runs" / "other").mkdir(parents=True)
    (out / "runs" / "other" / "events.out").write_text("logs of other work")
    (out / "notes.txt").write_text("mine")
    theirs = {name: folder_contents(out).get(name) for name in ("model_train.json", "notes.txt")}

    finetune(*argv(RUN, "--max_steps 1 --save_strategy no --overwrite_output_dir True", model=tiny_chat_model, out=out))
    names = {p.name for p in out.iterdir()}
    assert not any(n.startswith("checkpoint-") for n in names)  # the previous run's, recorded: gone
    assert (out / "runs" / "other" / "events.out").read_text() == "logs of other work"
    assert {name: (out / name).read_bytes() for name in theirs} == theirs
    assert "model_train.json" not in json.loads((out / WRITTEN_FILE).read_text())["written"]
    assert not (out / LOCK_FILE).exists()  # released


def test_overwrite_refuses_a_result_no_run_recorded(tiny_chat_model, tmp_path, capsys):
    """A folder holding a model's files that no llmft run recorded (an older version's run, or a model put there):
    neither removed by their names nor trained over."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "checkpoint-3").mkdir()
    (out / "README.md").write_text("my notes")  # the final save would replace it with PEFT's model card
    (out / "vocab.json").write_text('{"a": 0}')
    (out / "notes.txt").write_text("mine")
    before = folder_contents(out)
    err = refused(capsys, *argv(RUN, "--max_steps 1 --overwrite_output_dir True", model=tiny_chat_model, out=out))
    expected = "holds README.md, checkpoint-3, config.json, vocab.json, which no llmft run or tool recorded"
    assert f"--output_dir {out} {expected}" in err, err
    assert folder_contents(out) == before and (out / "checkpoint-3").is_dir()


def test_a_record_cannot_name_anything_outside_the_folder(tmp_path):
    out, victim = tmp_path / "out", tmp_path / "victim"
    out.mkdir()
    victim.mkdir()
    (victim / "keep").write_text("mine")
    (out / "link").symlink_to(victim, target_is_directory=True)
    (out / "checkpoint-1").mkdir()
    (out / WRITTEN_FILE).write_text(json.dumps({"written": ["../victim", "link", "checkpoint-1", "/etc", ".."]}))
    assert clear_previous_run(str(out)) == ["checkpoint-1", "link"]
    assert (victim / "keep").read_text() == "mine"  # the link went, not what it points to
    assert sorted(p.name for p in out.iterdir()) == [WRITTEN_FILE]
    (tmp_path / "precious").write_text("mine")
    (out / f"{WRITTEN_FILE}.tmp").symlink_to(tmp_path / "precious")  # where the record is written before its rename
    record_written(out, "a", "../b", "c/d")
    assert json.loads((out / WRITTEN_FILE).read_text())["written"] == ["a"]
    assert (tmp_path / "precious").read_text() == "mine"


# --- item 6: file modes never change through a link -----------------------------------------------------------------


def test_follow_umask_does_not_go_through_links(tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    (outside / "private").mkdir(parents=True)
    (outside / "tool").write_text("#!/bin/sh\n")
    (outside / "key").write_text("secret")
    os.chmod(outside / "tool", 0o755)
    os.chmod(outside / "key", 0o600)
    os.chmod(outside / "private", 0o700)
    out = tmp_path / "out"
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "checkpoint-1" / "weights").write_text("w")
    os.chmod(out / "checkpoint-1" / "weights", 0o600)
    (out / "checkpoint-2").symlink_to(outside, target_is_directory=True)
    (out / "checkpoint-1" / "inner").symlink_to(outside, target_is_directory=True)
    (out / "checkpoint-1" / "key-link").symlink_to(outside / "key")

    monkeypatch.setattr(os, "umask", lambda mask=0o022: 0o022)
    follow_umask(out)
    follow_umask(out / "checkpoint-2")  # what the final save does for each checkpoint-* it finds
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from llmft.saving import FollowUmaskCallback

    args = TrainingArguments(output_dir=str(out), report_to=[])
    FollowUmaskCallback().on_save(args, TrainerState(global_step=2), TrainerControl())

    modes = {name: stat.S_IMODE(os.stat(outside / name).st_mode) for name in ("tool", "key", "private")}
    assert modes == {"tool": 0o755, "key": 0o600, "private": 0o700}
    assert stat.S_IMODE(os.stat(out / "checkpoint-1" / "weights").st_mode) == 0o644  # its own files: fixed


# --- item 7: one process at a time in an output folder -------------------------------------------------------------

HOLD_LOCK = """
import sys
from llmft.run_folder import locked_output_dir
with locked_output_dir(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_a_second_run_on_a_held_folder_is_refused_naming_the_holder(tiny_chat_model, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        err = refused(capsys, *argv(RUN, "--max_steps 1", model=tiny_chat_model, out=out))
        assert f"--output_dir {out} is in use by another llmft process (pid {holder.pid} on " in err, err
        assert set(os.listdir(out)) == {LOCK_FILE}  # nothing of the refused run
    finally:
        holder.communicate("")
    assert holder.returncode == 0 and not out.exists()  # released, and the folder it made for nothing removed


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert holder.stdout.readline() == "locked\n"
    holder.kill()  # kill -9: nothing of llmft runs, the kernel drops the lock
    holder.wait()
    assert (out / LOCK_FILE).exists()
    with locked_output_dir(out):
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()


class SecondRunAtStart(TrainerCallback):
    """At the first step of a run, starts finetune.py on the same output folder and keeps what it said."""

    def __init__(self, args):
        self.args, self.result = [str(a) for a in args], None

    def on_step_end(self, args, state, control, **kwargs):
        if self.result is None:
            self.result = subprocess.run(
                [sys.executable, str(REPO / "finetune.py"), *self.args],
                capture_output=True,
                text=True,
                timeout=600,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )


@pytest.mark.slow
def test_two_runs_on_one_folder_the_second_is_refused(tiny_chat_model, tmp_path):
    out = tmp_path / "out"
    second = SecondRunAtStart(argv(RUN, "--max_steps 2 --lora_r 4 --save_steps 1", model=tiny_chat_model, out=out))
    finetune(*argv(RUN, "--max_steps 2 --save_steps 1", model=tiny_chat_model, out=out), callbacks=[second])
    result = second.result
    assert result.returncode == EXIT_USER_ERROR, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: --output_dir {out} is in use by another llmft process (pid {os.getpid()} on ")
    assert json.loads((out / "adapter_config.json").read_text())["r"] != 4  # the first run's alone
    assert not (out / LOCK_FILE).exists()


def test_a_tool_refuses_an_output_folder_a_run_holds(tmp_path):
    from llmft.run_folder import staged_output_dir

    out = tmp_path / "out"
    with locked_output_dir(out):
        record_written(out, "adapter_model.safetensors")
        (out / "adapter_model.safetensors").write_text("the run's")
        with pytest.raises(LlmftError, match=f"in use by another llmft process \\(pid {os.getpid()} "):
            with staged_output_dir(out, force=True):
                pytest.fail("wrote into a folder another process holds")
    with locked_output_dir(tmp_path / "merged", staged=True):
        with pytest.raises(LlmftError, match="in use by another llmft process"):
            with staged_output_dir(tmp_path / "merged", force=False):
                pytest.fail("two tools wrote one result")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock or partial folder left behind


def test_quantize_refuses_an_output_holding_its_calibration_data(tiny_chat_model, tmp_path):
    from llmft.tools.quantize import run_gptq

    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(EXAMPLES, project / "data.json")
    with pytest.raises(LlmftError, match=f"--output_dir {project} contains --data_path {project / 'data.json'}"):
        run_gptq(str(tiny_chat_model), str(project / "data.json"), project, overwrite_output_dir=True)
    assert sorted(p.name for p in project.iterdir()) == ["data.json"]


# --- item 14: a disk that fills up during a save --------------------------------------------------------------------


class DiskFullAtSecondCheckpoint:
    """The adapter file of checkpoint-2 runs out of space halfway, as safetensors reports it on a full disk."""

    def __init__(self, save):
        self.save, self.calls = save, 0

    def __call__(self, tensors, filename, *args, **kwargs):
        self.calls += 1
        if "checkpoint-2" in str(filename):
            with open(filename, "wb") as f:
                f.write(b"\x10\x00\x00\x00")
            from safetensors import SafetensorError

            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return self.save(tensors, filename, *args, **kwargs)


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_is_a_clear_error_and_resume_is_exact(
    tiny_chat_model, tmp_path, capsys, monkeypatch
):
    import peft.peft_model
    from safetensors.torch import load_file

    run = RUN + " --max_steps 3 --save_steps 1 --lora_dropout 0 --warmup_steps 0"
    reference = tmp_path / "reference"
    finetune(*argv(run, "--save_strategy no", model=tiny_chat_model, out=reference))

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(peft.peft_model, "safe_save_file", DiskFullAtSecondCheckpoint(peft.peft_model.safe_save_file))
        err = refused(capsys, *argv(run, model=tiny_chat_model, out=out))
    assert f"error: the disk of --output_dir {out} is full" in err.strip().splitlines()[-1], err  # after tqdm's bar
    assert "No space left on device" in err and "--resume_from_checkpoint True" in err
    assert (out / "checkpoint-1" / "trainer_state.json").exists()  # the earlier checkpoint: whole
    assert not (out / LOCK_FILE).exists()

    finetune(*argv(run, "--resume_from_checkpoint True", model=tiny_chat_model, out=out))
    resumed = load_file(out / "adapter_model.safetensors")
    expected = load_file(reference / "adapter_model.safetensors")
    assert resumed.keys() == expected.keys()
    for key, tensor in expected.items():  # one process: the tolerance of tests/test_preemption.py
        assert torch.allclose(resumed[key], tensor, atol=1e-6, rtol=0), (key, (resumed[key] - tensor).abs().max())


ON_A_SMALL_TMPFS = """
set -u
mount -t tmpfs -o size=5m tmpfs "$DISK" || exit 90
"$PYTHON" "$REPO/finetune.py" "$@" --output_dir "$DISK/out" 2> "$LOGS/full.err"; echo $? > "$LOGS/full.rc"
ls "$DISK/out/checkpoint-1" > "$LOGS/checkpoint-1.ls"
mount -o remount,size=256m tmpfs "$DISK"  # space freed
"$PYTHON" "$REPO/finetune.py" "$@" --output_dir "$DISK/out" --resume_from_checkpoint True 2> "$LOGS/resume.err"
echo $? > "$LOGS/resume.rc"
cp "$DISK/out/adapter_model.safetensors" "$LOGS/"
"""


def can_mount_a_tmpfs(tmp_path) -> bool:
    (tmp_path / "probe").mkdir()
    probe = f"mount -t tmpfs -o size=1m tmpfs {tmp_path / 'probe'}"
    return shutil.which("unshare") is not None and subprocess.run(["unshare", "-rm", "sh", "-c", probe]).returncode == 0


@pytest.mark.slow
def test_a_real_full_disk_during_a_checkpoint(tiny_chat_model, tmp_path):
    """The same on a 5 MB tmpfs (in a user and mount namespace of its own; skipped where the system refuses one): a
    tiny model's checkpoint takes 3.2 MB, so the second one fills the disk inside torch.save, whose error carries no
    errno."""
    from safetensors.torch import load_file

    if not can_mount_a_tmpfs(tmp_path):
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    run = argv(
        RUN, "--max_steps 3 --lora_dropout 0 --warmup_steps 0", model=tiny_chat_model, out=tmp_path / "reference"
    )
    finetune(*run, "--save_strategy", "no")
    disk, logs = tmp_path / "disk", tmp_path / "logs"
    disk.mkdir()
    logs.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "DISK": str(disk), "LOGS": str(logs), "REPO": str(REPO)}
    env["PYTHON"] = sys.executable
    args = [str(a) for a in run[:4] + run[6:]] + ["--save_steps", "1"]  # --output_dir: the tmpfs
    subprocess.run(["unshare", "-rm", "sh", "-c", ON_A_SMALL_TMPFS, "sh", *args], env=env, timeout=900, check=True)

    err = (logs / "full.err").read_text()
    assert (logs / "full.rc").read_text().strip() == str(EXIT_USER_ERROR), err[-3000:]
    assert f"error: the disk of --output_dir {disk / 'out'} is full" in err and "Traceback" not in err
    assert "trainer_state.json" in (logs / "checkpoint-1.ls").read_text().split()
    assert (logs / "resume.rc").read_text().strip() == "0", (logs / "resume.err").read_text()[-3000:]
    resumed, expected = (
        load_file(logs / "adapter_model.safetensors"),
        load_file(tmp_path / "reference" / "adapter_model.safetensors"),
    )
    for key, tensor in expected.items():
        assert torch.allclose(resumed[key], tensor, atol=1e-6, rtol=0), (key, (resumed[key] - tensor).abs().max())


def test_torch_save_on_a_full_disk_is_told_apart(tmp_path, monkeypatch):
    """torch.save's writer loses the errno: its error counts as a full disk only when the file system is nearly full."""
    error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    class Status:
        f_frsize, f_bavail = 4096, 3

    for free, expected in ((Status, LlmftError), (os.statvfs(tmp_path), RuntimeError)):
        monkeypatch.setattr(os, "statvfs", lambda path, free=free: free)
        with pytest.raises(expected):
            with disk_full_is_user_error(tmp_path):
                raise error
    with pytest.raises(LlmftError, match="is full .*No space left on device"):
        with disk_full_is_user_error(tmp_path):
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.json"))


def test_a_tool_refuses_a_linked_output_folder(tmp_path):
    from llmft.run_folder import staged_output_dir

    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target", target_is_directory=True)
    with pytest.raises(LlmftError, match="is a symbolic link: give the folder it points to"):
        with staged_output_dir(tmp_path / "link", force=True):
            pytest.fail("wrote beside the link's target")
    assert (tmp_path / "link").is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["link", "target"]


def test_a_tool_on_a_full_disk_says_so_and_leaves_nothing(tmp_path):
    from llmft.run_folder import staged_output_dir

    with pytest.raises(LlmftError, match="is full .*No space left on device.*nothing was written to"):
        with staged_output_dir(tmp_path / "merged", force=False) as staging:
            (staging / "config.json").write_text("{}")
            from safetensors import SafetensorError

            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert list(tmp_path.iterdir()) == []


# --- item 20: make-tiny-model's files read like any file the user makes ----------------------------------------------


def test_make_tiny_model_follows_the_umask(tmp_path):
    from llmft.tools.tiny_model import make_tiny_model

    previous = os.umask(0o022)
    try:
        folder = make_tiny_model(tmp_path / "tiny")
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes["model.safetensors"] == 0o644
    assert set(modes.values()) == {0o644}, modes
