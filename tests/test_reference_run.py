"""One recorded reference: the per-step training losses of a short, deterministic LoRA run of the tiny chat model
through finetune.py, compared with values recorded from a run of this code.

Every other test checks a property (masks, packing equivalence, weights changed, reloads); this one pins the numbers,
so a change anywhere on the path from data to optimizer step (rendering, masking, packing, loss normalisation, LoRA
set-up, the learning-rate schedule) that moves the losses is seen even when it keeps every property. The run is
deterministic on CPU: fp32, seed 0 for the weights (tools/make_tiny_model.py), the adapter and the data order, no
dropout, one process, and every setting that shapes it is spelled out below rather than left to a default.

When a change moves the losses on purpose, record new values: run this test, which prints the losses it got on a
mismatch, check the new trajectory still falls as before, and paste it below with the reason in the commit message.
"""

from __future__ import annotations

import pytest

from tests.conftest import argv, chat_record, write_records

RECORDS = [
    chat_record(question, answer, id=f"r{i}")
    for i, (question, answer) in enumerate(
        [
            ("Who are you?", "I am Pico, a small assistant."),
            ("What is 2 + 3?", "2 + 3 is 5."),
            ("Name a colour.", "Blue."),
            ("What do cats say?", "Cats say meow."),
            ("Where is the sun?", "The sun is in the sky."),
            ("Say hello.", "Hello!"),
            ("What is water?", "Water is a liquid."),
            ("Count to three.", "One, two, three."),
        ]
    )
]

FLAGS = argv(
    "--use_lora True --lora_r 8 --lora_alpha 16 --lora_dropout 0 --lora_target_modules all-linear",
    "--packing True --max_tokens_per_batch 0 --model_max_length 128 --max_steps 6",
    "--per_device_train_batch_size 4 --gradient_accumulation_steps 1 --learning_rate 3e-3",
    "--lr_scheduler_type linear --warmup_steps 0 --weight_decay 0 --optim adamw_torch --logging_steps 1",
    "--save_strategy no --report_to none --seed 0 --data_seed 0 --use_cpu True",
)

# Recorded from this run (torch 2.14, transformers 5.23, peft 0.21 on CPU; the same to every digit with 1 and 2
# threads). Re-recorded when the first batch began to hold the longest samples (llmft.data.packing.LongestFirstSampler);
# with none moved the sampler gives the values recorded before, [7.097960, 7.003369, 6.848625, 6.748844, 6.697990,
# 6.641222], to every digit.
REFERENCE_LOSSES = [7.103759, 6.983069, 6.798969, 6.745885, 6.657279, 6.641953]
TOLERANCE = 1e-4  # relative, per step


def test_lora_run_follows_the_recorded_loss_trajectory(tiny_chat_model, tmp_path, run_finetune):
    data = write_records(tmp_path / "train.json", RECORDS)
    trainer = run_finetune(
        "--model_name_or_path", tiny_chat_model, "--data_path", data, "--output_dir", tmp_path / "out", *FLAGS
    )
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    assert len(losses) == 6
    assert losses == pytest.approx(REFERENCE_LOSSES, rel=TOLERANCE), f"losses of this run: {losses}"
