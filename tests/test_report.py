"""The run report (issue 8, Build): training_report.json and .png at every checkpoint and at the end of a run; its
token counts are those of the data the run trained on, worked out here from the dataset's own rows."""

from __future__ import annotations

import json

import pytest

from llmft.data.render import IGNORE_INDEX
from llmft.errors import EXIT_PREEMPTED
from llmft.run_folder import RUN_SETTINGS_FILE
from llmft import report as report_module
from llmft.report import REPORT_JSON, REPORT_PNG
from tests.conftest import EXAMPLES, TINY_LORA, SignalAtStep, argv, finetune

EPOCHS = 2


# argv() fills {model} and {out}
RUN = (
    TINY_LORA
    + " --lora_dropout 0 --per_device_train_batch_size 4 --learning_rate 1e-3 --warmup_steps 0 --logging_steps 1"
)


def data_counts(dataset) -> tuple[int, int]:
    """(tokens, trained tokens) of one pass over the training rows."""
    tokens = trained = 0
    for row in dataset:
        labels = list(row["labels"])
        assert labels[0] == IGNORE_INDEX  # a row starts with <|im_start|>: nothing predicts it
        tokens += len(row["input_ids"])
        trained += sum(label != IGNORE_INDEX for label in labels)
    return tokens, trained


@pytest.mark.parametrize("packing", ["True", "False"])
def test_report_counts_what_the_data_holds(packing, tiny_chat_model, tmp_path, datasets_cache):
    out = tmp_path / "out"
    trainer = finetune(
        *argv(
            RUN,
            f"--num_train_epochs {EPOCHS} --packing {packing} --save_strategy epoch",
            model=tiny_chat_model,
            out=out,
        )
    )
    tokens, trained = data_counts(trainer.train_dataset)
    report = json.loads((out / REPORT_JSON).read_text())
    assert report["trained_tokens"] == EPOCHS * trained
    assert report["tokens_seen"] == EPOCHS * tokens
    assert report["tokens_processed"] >= report["tokens_seen"]  # padding: to a multiple of 64 or of the longest
    assert report["global_step"] == trainer.state.global_step == report["max_steps"]
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    mean = next(e["train_loss"] for e in trainer.state.log_history if "train_loss" in e)
    assert report["loss"] == {"final": losses[-1], "best": min(losses), "mean": mean}
    # the data the run had: records in the file, and the samples and tokens of one pass over them
    assert report["data"] == {
        "train": {
            "path": str(EXAMPLES),
            "records": len(json.loads(EXAMPLES.read_text())),
            "samples": len(trainer.train_dataset),
            "tokens": tokens,
            "trained_tokens": trained,
        }
    }
    assert report["eval_loss"] == {"final": None, "best": None}
    assert report["tokens_per_second"] > 0 and report["wall_time_s"] > 0 and report["peak_memory_bytes"] > 2**20
    assert report["settings_fingerprint"] == json.loads((out / RUN_SETTINGS_FILE).read_text())["fingerprint"]
    assert report["settings"]["num_train_epochs"] == EPOCHS
    assert {"torch", "transformers", "peft", "python"} <= set(report["versions"])
    assert (out / REPORT_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # each epoch's checkpoint holds the report as it stood then: half the tokens after the first
    steps_per_epoch = trainer.state.global_step // EPOCHS
    first = json.loads((out / f"checkpoint-{steps_per_epoch}" / REPORT_JSON).read_text())
    assert first["trained_tokens"] == trained and first["tokens_seen"] == tokens


def assert_first_step_figures_agree(report: dict, first_step: int) -> None:
    """The first-step figures against the whole-run ones of the same report: the first step's tokens are what the
    per-step counts say, and the speed after it is the rest of the tokens over the rest of the time."""
    at_step = {int(k): v for k, v in report["tokens_at_step"].items()}
    before = at_step.get(first_step - 1, 0)
    assert report["first_step_tokens_seen"] == at_step[first_step] - before > 0
    session_tokens = report["tokens_seen"] - before
    session_s = session_tokens / report["tokens_per_second"]
    assert 0 < report["first_step_s"] < session_s <= report["wall_time_s"] + 1e-9
    later_tokens = session_tokens - report["first_step_tokens_seen"]
    assert report["tokens_per_second_after_first_step"] * (session_s - report["first_step_s"]) == pytest.approx(
        later_tokens, rel=1e-9
    )


def test_report_gives_the_first_step_beside_the_whole_run(tiny_chat_model, tmp_path, datasets_cache, monkeypatch):
    """Time to the first optimizer step and tokens/s after it, consistent with the whole-run figures; with the
    steps' counts stacked every 2 steps (on the device, unread) the counts are still exactly the data's."""
    monkeypatch.setattr(report_module, "PENDING_CHUNK", 2)
    out = tmp_path / "out"
    trainer = finetune(*argv(RUN, "--num_train_epochs 1 --save_strategy no", model=tiny_chat_model, out=out))
    report = json.loads((out / REPORT_JSON).read_text())
    tokens, trained = data_counts(trainer.train_dataset)
    assert (report["tokens_seen"], report["trained_tokens"]) == (tokens, trained)
    assert len(report["tokens_at_step"]) == report["global_step"] > 3
    assert_first_step_figures_agree(report, first_step=1)


@pytest.mark.slow
def test_resumed_run_continues_the_counts(tiny_chat_model, tmp_path, datasets_cache):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run = RUN + " --max_steps 6 --save_strategy steps --save_steps 100"
    finetune(*argv(run, model=tiny_chat_model, out=whole))
    with pytest.raises(SystemExit) as exit_info:
        finetune(*argv(run, model=tiny_chat_model, out=resumed), callbacks=[SignalAtStep(2)])
    assert exit_info.value.code == EXIT_PREEMPTED
    at_stop = json.loads((resumed / REPORT_JSON).read_text())
    assert at_stop["global_step"] == 3 and 0 < at_stop["tokens_seen"]
    finetune(*argv(run, "--resume_from_checkpoint auto", model=tiny_chat_model, out=resumed))
    expected, actual = (json.loads((d / REPORT_JSON).read_text()) for d in (whole, resumed))
    for key in ("tokens_seen", "tokens_processed", "trained_tokens", "tokens_at_step"):
        assert actual[key] == expected[key], key
    assert at_stop["tokens_seen"] == expected["tokens_at_step"]["3"]
    # the first-step figures are the resumed session's: its first step is step 4
    assert_first_step_figures_agree(at_stop, first_step=1)
    assert_first_step_figures_agree(actual, first_step=4)


@pytest.mark.gpu
def test_counting_never_waits_for_the_gpu():
    """The report's count of each micro-batch and its bookkeeping at each step after the first only queue GPU work:
    under CUDA's sync debug mode "error" any wait for the GPU (a .item(), a copy of a host value onto the GPU) raises.
    The first step's end waits once, on purpose (first_step_s)."""
    from types import SimpleNamespace

    import torch

    from llmft.report import TrainingReportCallback, batch_token_counts

    cuda = torch.device("cuda")
    ids = torch.randint(5, 100, (2, 256), device=cuda)
    labels = torch.where(torch.rand(2, 256, device=cuda) < 0.5, ids, IGNORE_INDEX)
    positions = torch.cat([torch.arange(100), torch.arange(120), torch.arange(36)]).to(cuda).expand(2, -1)
    packed = {"input_ids": ids, "labels": labels, "position_ids": positions}
    padded = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}

    class Model(torch.nn.Module):
        def forward(self, **batch: torch.Tensor) -> None:
            return None

    model, callback, args = Model(), TrainingReportCallback(), SimpleNamespace(device=cuda)
    tokenizer = SimpleNamespace(pad_token_id=0)  # packed rows take the padding-tail branch
    callback.on_train_begin(args, SimpleNamespace(global_step=0), None, model=model, processing_class=tokenizer)
    model(**packed)
    callback.on_step_end(args, SimpleNamespace(global_step=1), None)  # the first step: its one wait
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(2, 2 + 2 * report_module.PENDING_CHUNK):  # past the stacking of pending steps
            model(**(packed if step % 2 else padded))
            callback.on_step_end(args, SimpleNamespace(global_step=step), None)
        batch_token_counts(packed, pad_token_id=0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
