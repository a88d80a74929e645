"""The whole path a user takes, through the real entry points: finetune.py (LoRA, Q-LoRA) until the model has learned
an identity answer, then merge, GPTQ-quantize and chat, checking the answer survives each step."""

import json

import pytest
import torch

from llmft.inference import generate_reply, load_for_inference
from tests.conftest import argv, assistant_token_loss, chat_record, write_records

IDENTITY = "I am Pico, a small assistant fine-tuned with llmft."
QUESTIONS = ["Who are you?", "What is your name?", "Introduce yourself.", "Tell me who you are."]


@pytest.fixture(scope="module")
def identity_data(tmp_path_factory):
    records = [chat_record(q, IDENTITY, id=f"id{i}-{j}") for j in range(4) for i, q in enumerate(QUESTIONS)]
    return write_records(tmp_path_factory.mktemp("data") / "identity.json", records)


def greedy_answer(path, question="Who are you?") -> str:
    model, tokenizer = load_for_inference(str(path), dtype="float32")
    torch.manual_seed(0)
    return generate_reply(
        model, tokenizer, [{"role": "user", "content": question}], max_new_tokens=24, temperature=0
    ).text


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_finetune_merge_quantize_chat(mode, tiny_chat_model, identity_data, tmp_path, run_finetune):
    from llmft.tools.merge import merge_lora
    from llmft.tools.quantize import run_gptq

    adapter, merged, quantized = tmp_path / "adapter", tmp_path / "merged", tmp_path / "gptq"
    quantization = "--q_lora True" if mode == "qlora" else ""
    run_finetune(
        *argv(
            "--model_name_or_path {model} --data_path {data} --output_dir {adapter} --use_lora True",
            quantization,
            "--lora_r 16 --lora_alpha 32 --lora_dropout 0 --num_train_epochs 40 --per_device_train_batch_size 8",
            "--learning_rate 3e-3 --save_strategy no --logging_steps 10 --report_to none --seed 0",
            model=tiny_chat_model,
            data=identity_data,
            adapter=adapter,
        )
    )
    assert greedy_answer(adapter) == IDENTITY
    assert greedy_answer(adapter, "What is your name?") == IDENTITY

    result = merge_lora(str(adapter), str(merged), data_path=str(identity_data))
    assert result.argmax_agreement == 1.0 and result.max_abs_diff < 1e-3
    assert greedy_answer(merged) == IDENTITY

    run_gptq(str(merged), str(identity_data), quantized, bits=4, num_samples=12, eval_samples=4)
    saved = json.loads((quantized / "quantization_report.json").read_text())
    held_out = [(QUESTIONS[i], IDENTITY) for i in range(4)]  # the data's last 4 records
    assert saved["quantized"]["loss"] == pytest.approx(assistant_token_loss(quantized, held_out)[0], rel=1e-4)
    assert saved["original"]["loss"] == pytest.approx(assistant_token_loss(merged, held_out)[0], rel=1e-4)
    # a 0.4M-parameter model has little to spare for 4-bit rounding: the cost is measured and bounded
    assert abs(saved["quantized"]["loss"] - saved["original"]["loss"]) < 0.5
    answer = greedy_answer(quantized)
    assert answer == IDENTITY or answer.startswith(IDENTITY.split(",")[0]), answer
