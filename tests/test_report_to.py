"""--report_to: a tiny LoRA run logging to TensorBoard, offline, writes event files holding the train loss the Trainer
logged, where README's Logging paragraph says; a backend whose package is missing is refused before anything loads."""

from __future__ import annotations

import pytest

from llmft.config import parse_args
from llmft.errors import ConfigError
from tests.conftest import EXAMPLES, chat_record, write_records
from tests.conftest import ANSWER, TRAIN, argv, logged_losses


@pytest.fixture(scope="module")
def repeated_data(tmp_path_factory):
    return write_records(
        tmp_path_factory.mktemp("data") / "repeated.json",
        [chat_record("Who are you?", ANSWER, id=f"r{i}") for i in range(8)],
    )


def event_losses(folder) -> list[tuple[int, float]]:
    """(step, value) of every train/loss scalar in the TensorBoard event files under `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(folder.rglob("events.out.tfevents.*"))
    assert len(files) == 1, files
    events = EventAccumulator(str(files[0].parent))
    events.Reload()
    assert "train/loss" in events.Tags()["scalars"], events.Tags()
    return [(event.step, event.value) for event in events.Scalars("train/loss")]


def logged_steps_and_losses(trainer) -> list[tuple[int, float]]:
    return [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]


def test_tensorboard_events_hold_the_train_loss(tiny_chat_model, repeated_data, tmp_path, run_finetune, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    out = tmp_path / "run"
    trainer = run_finetune(
        *argv(
            TRAIN,
            "--max_steps 4 --learning_rate 5e-3 --use_lora True --report_to tensorboard",
            model=tiny_chat_model,
            data=repeated_data,
            out=out,
        )
    )
    assert len(logged_losses(trainer)) == 4
    # transformers' default place: OUTPUT_DIR/runs/<date>_<host>/
    assert [p.parent.parent for p in out.rglob("events.out.tfevents.*")] == [out / "runs"]
    written = event_losses(out / "runs")
    expected = logged_steps_and_losses(trainer)
    assert [step for step, _ in written] == [step for step, _ in expected] == [1, 2, 3, 4]
    # float32 in the event file, the Trainer's float in its log history
    assert [value for _, value in written] == pytest.approx([value for _, value in expected], rel=1e-6)
    assert (out / "adapter_model.safetensors").is_file()  # the save is unaffected by the runs/ folder beside it


def test_tensorboard_logging_dir_from_the_environment(
    tiny_chat_model, repeated_data, tmp_path, run_finetune, monkeypatch
):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    out = tmp_path / "run"
    trainer = run_finetune(
        *argv(
            TRAIN,
            "--max_steps 2 --learning_rate 5e-3 --use_lora True --report_to tensorboard",
            model=tiny_chat_model,
            data=repeated_data,
            out=out,
        )
    )
    assert not (out / "runs").exists()
    written, expected = event_losses(tmp_path / "tb"), logged_steps_and_losses(trainer)
    assert [step for step, _ in written] == [step for step, _ in expected] == [1, 2]
    assert [value for _, value in written] == pytest.approx([value for _, value in expected], rel=1e-6)


@pytest.mark.parametrize(
    "backend, check", [("tensorboard", "is_tensorboard_available"), ("wandb", "is_wandb_available")]
)
def test_backend_without_its_package_is_refused(backend, check, tiny_chat_model, tmp_path, monkeypatch):
    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, check, lambda: False)
    with pytest.raises(ConfigError) as info:
        parse_args(
            argv(
                "--model_name_or_path {model} --data_path {examples} --output_dir {out} --max_steps 1",
                "--report_to {backend}",
                model=tiny_chat_model,
                examples=EXAMPLES,
                out=tmp_path / "out",
                backend=backend,
            )
        )
    assert info.value.problems == [
        f"--report_to {backend}: the {backend} package is not installed (pip install "
        f"{backend}; see README, Logging), or choose --report_to none"
    ]
