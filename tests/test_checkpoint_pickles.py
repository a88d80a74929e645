"""Resume refuses a checkpoint whose pickles could run code (issue 8): DeepSpeed unpickles global_step*/*.pt with
weights_only=False, so llmft lists each pickle's globals first (llmft/checkpoint_pickles.py). The payload here is
live: unpickled as DeepSpeed does, it creates a marker file; refused, the marker never appears."""

from __future__ import annotations

import pickle
import shutil

import pytest
import torch

from llmft.checkpoint_pickles import ALLOWED_GLOBALS, check_checkpoint_pickles, checkpoint_pickles, pickle_problem
from llmft.errors import EXIT_USER_ERROR, LlmftError
from tests.conftest import TINY_LORA, argv


class CreatesFile:
    """Unpickled, opens (creates) `path`: any code could run in its place."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def write_payload(path, marker, **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"module": {"w": torch.zeros(2)}, "client_state": CreatesFile(marker)}, path, **save)


def test_the_payload_runs_when_unpickled_as_deepspeed_does(tmp_path):
    """The test's own premise: without the check, loading this file runs its code."""
    write_payload(tmp_path / "states.pt", tmp_path / "ran")
    torch.load(tmp_path / "states.pt", weights_only=False)
    assert (tmp_path / "ran").exists()


def test_pickle_problem_names_the_globals_outside_the_allowlist(tmp_path):
    write_payload(tmp_path / "states.pt", tmp_path / "ran")
    assert pickle_problem(str(tmp_path / "states.pt")) == "imports io.open"
    torch.save({"w": torch.ones(3), "n": 3, "name": "x"}, tmp_path / "plain.pt")
    assert pickle_problem(str(tmp_path / "plain.pt")) is None
    assert not (tmp_path / "ran").exists()


def test_files_that_cannot_be_checked_are_refused(tmp_path):
    # the legacy (non-zip) torch.save format, and a pickle that imports through STACK_GLOBAL (protocol 4)
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert pickle_problem(str(tmp_path / "legacy.pt")).startswith(
        "cannot be checked: Expected input to be a checkpoint returned by torch.save"
    )
    write_payload(tmp_path / "protocol4.pt", tmp_path / "ran", pickle_protocol=4)
    assert pickle_problem(str(tmp_path / "protocol4.pt")).startswith("cannot be checked: UnpicklingError")
    (tmp_path / "raw.bin").write_bytes(pickle.dumps(CreatesFile(tmp_path / "ran")))
    assert pickle_problem(str(tmp_path / "raw.bin")).startswith("cannot be checked")
    assert not (tmp_path / "ran").exists()


def test_the_allowlist_holds_no_callable_that_runs_code():
    assert not {g for g in ALLOWED_GLOBALS if g.startswith(("builtins.", "os.", "subprocess.", "posix."))}


def test_which_files_are_checked(tmp_path):
    for name in (
        "rng_state_0.pth",
        "scheduler.pt",
        "training_args.bin",
        "global_step2/mp_rank_00_model_states.pt",
        "adapter_model.safetensors",
        "latest",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [p.removeprefix(f"{tmp_path}/") for p in checkpoint_pickles(str(tmp_path))] == [
        "global_step2/mp_rank_00_model_states.pt",
        "rng_state_0.pth",
        "scheduler.pt",
    ]  # training_args.bin: never read
    check_checkpoint_pickles(str(tmp_path), trust=True)  # trusted: nothing read
    with pytest.raises(LlmftError, match="--trust_checkpoint_pickles True"):
        check_checkpoint_pickles(str(tmp_path))


def test_a_linked_folder_or_file_is_checked_too(tmp_path):
    """Issue 16.5: os.walk did not follow a global_step* link, whose pickles DeepSpeed unpickles all the same."""
    elsewhere, checkpoint = tmp_path / "elsewhere", tmp_path / "checkpoint-1"
    write_payload(elsewhere / "mp_rank_00_model_states.pt", tmp_path / "ran")
    checkpoint.mkdir()
    (checkpoint / "global_step1").symlink_to(elsewhere, target_is_directory=True)
    (checkpoint / "rng_state.pth").symlink_to(elsewhere / "mp_rank_00_model_states.pt")
    (elsewhere / "loop").symlink_to(checkpoint, target_is_directory=True)  # listed once, not forever
    assert [p.removeprefix(f"{checkpoint}/") for p in checkpoint_pickles(str(checkpoint))] == [
        "global_step1/mp_rank_00_model_states.pt",
        "rng_state.pth",
    ]
    with pytest.raises(LlmftError, match="global_step1/mp_rank_00_model_states.pt: imports io.open"):
        check_checkpoint_pickles(str(checkpoint))
    assert not (tmp_path / "ran").exists()


# a checkpoint every step; argv() fills {model} and {out}
RUN = TINY_LORA + " --per_device_train_batch_size 2 --save_steps 1"


@pytest.fixture
def checkpointed_run(tiny_chat_model, tmp_path, run_finetune):
    out = tmp_path / "out"
    run_finetune(*argv(RUN, "--max_steps 2", model=tiny_chat_model, out=out))
    shutil.rmtree(out / "checkpoint-2")  # resuming at step 1 would write checkpoint-2 again
    assert pickle_problem(str(out / "checkpoint-1" / "rng_state.pth")) is None  # the Trainer's own files pass
    return out


@pytest.mark.parametrize("planted", ["global_step1/mp_rank_00_model_states.pt", "rng_state.pth", "linked global_step1"])
@pytest.mark.parametrize(
    "resume", ["True", pytest.param("auto", marks=pytest.mark.slow), pytest.param("path", marks=pytest.mark.slow)]
)
def test_resume_refuses_a_crafted_checkpoint_naming_the_file(
    planted, resume, checkpointed_run, tiny_chat_model, run_finetune, tmp_path, capsys
):
    out = checkpointed_run
    marker = tmp_path / "code-ran"
    if planted == "linked global_step1":  # issue 16.5: a link to a folder elsewhere that holds the crafted file
        write_payload(tmp_path / "elsewhere" / "mp_rank_00_model_states.pt", marker)
        (out / "checkpoint-1" / "global_step1").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
        planted = "global_step1/mp_rank_00_model_states.pt"
    else:
        write_payload(out / "checkpoint-1" / planted, marker)
    (out / "checkpoint-1" / "latest").write_text("global_step1")  # a DeepSpeed checkpoint is complete with it
    resume = str(out / "checkpoint-1") if resume == "path" else resume
    with pytest.raises(SystemExit) as exit_info:
        run_finetune(
            *argv(RUN, "--max_steps 2 --resume_from_checkpoint {resume}", model=tiny_chat_model, out=out, resume=resume)
        )
    assert exit_info.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert f"{out / 'checkpoint-1' / planted}: imports io.open" in err, err
    assert "--trust_checkpoint_pickles True" in err and "Traceback" not in err
    assert not marker.exists()
    assert not (out / "checkpoint-2").exists()  # nothing trained


def test_trust_flag_skips_the_check(checkpointed_run, tiny_chat_model, run_finetune, tmp_path):
    """A pickle no one reads on this run (a DeepSpeed file, resumed without DeepSpeed) lets the flag be seen to act
    without running the payload."""
    out = checkpointed_run
    write_payload(out / "checkpoint-1" / "global_step1" / "mp_rank_00_model_states.pt", tmp_path / "code-ran")
    (out / "checkpoint-1" / "latest").write_text("global_step1")
    flags = "--max_steps 2 --resume_from_checkpoint True --trust_checkpoint_pickles True"
    trainer = run_finetune(*argv(RUN, flags, model=tiny_chat_model, out=out))
    assert trainer.state.global_step == 2
    assert not (tmp_path / "code-ran").exists()
