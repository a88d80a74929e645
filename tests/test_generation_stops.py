"""The one stop-token policy (`llmft.chat_template.generation_stops`) on chat, base and Qwen's real tokenizers and on
one whose EOS is not its end-of-turn token; and the places that use it agreeing: the generation config a training run
saves, the stops tools/chat.py generates with, and the generation config tools/make_tiny_model.py writes."""

from __future__ import annotations

import copy
import json

import pytest

from llmft.chat_template import ENDOFTEXT, IM_END, GenerationStops, generation_stops
from llmft.inference import generate_reply, load_for_inference
from tests.conftest import argv, chat_record, write_records

IM_END_ID, ENDOFTEXT_ID = 1026, 1024  # in the tiny BPE vocabulary (tools/make_tiny_model.py)


def test_chat_tokenizer_stops_at_end_of_turn_then_end_of_text(bpe_tokenizer):
    assert bpe_tokenizer.convert_tokens_to_ids([IM_END, ENDOFTEXT]) == [IM_END_ID, ENDOFTEXT_ID]
    assert generation_stops(bpe_tokenizer) == GenerationStops([IM_END_ID, ENDOFTEXT_ID], ENDOFTEXT_ID)


def test_base_tokenizer_without_a_template_stops_at_end_of_text():
    from llmft.tools.tiny_model import make_tokenizer

    base = make_tokenizer("bpe", chat=False)
    assert not base.chat_template
    assert generation_stops(base) == GenerationStops([ENDOFTEXT_ID], ENDOFTEXT_ID)


def test_qwen_vocabulary_stops_as_qwen2_5_instruct_does(qwen_tokenizer):
    # Qwen2.5-Instruct's generation_config.json: "eos_token_id": [151645, 151643], "pad_token_id": 151643
    assert generation_stops(qwen_tokenizer) == GenerationStops([151645, 151643], 151643)


def test_end_of_turn_comes_first_when_eos_is_another_token(bpe_tokenizer):
    """As in Llama 3 (end of turn <|eot_id|>, EOS <|end_of_text|>): the token the template closes a turn with first,
    then EOS, then the end-of-document token; no pad token means padding with the first stop."""
    tokenizer = copy.deepcopy(bpe_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|end_turn|>"]})
    end_turn = tokenizer.convert_tokens_to_ids("<|end_turn|>")
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|end_turn|>\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    assert tokenizer.eos_token == IM_END
    assert generation_stops(tokenizer) == GenerationStops([end_turn, IM_END_ID, ENDOFTEXT_ID], ENDOFTEXT_ID)

    tokenizer.pad_token = None
    assert generation_stops(tokenizer).pad_token_id == end_turn


def test_configured_eos_ids_follow_without_repeats_or_ids_beyond_the_vocabulary(bpe_tokenizer):
    stops = generation_stops(bpe_tokenizer, [ENDOFTEXT_ID, 5], None, 5, len(bpe_tokenizer), 151643)
    assert stops.eos_token_ids == [IM_END_ID, ENDOFTEXT_ID, 5]


@pytest.mark.parametrize("base", ["tiny_chat_model", "tiny_base_model"])
def test_training_chat_and_the_tiny_model_stop_alike(base, request, tmp_path, run_finetune):
    """The generation config a LoRA run saves, the stops tools/chat.py's generate_reply hands `generate`, and (for the
    chat model) the generation config tools/make_tiny_model.py wrote: the same ids. The base model's own config
    stops at <|endoftext|> only; training adds ChatML and stops at its <|im_end|> first."""
    base_dir = request.getfixturevalue(base)
    data = write_records(tmp_path / "train.json", [chat_record("Hi", "Hello!", id=f"r{i}") for i in range(4)])
    out = tmp_path / "out"
    run_finetune(
        *argv(
            "--model_name_or_path {base_dir} --data_path {data} --output_dir {out} --use_lora True",
            "--max_steps 1 --per_device_train_batch_size 2 --model_max_length 64 --save_strategy no",
            "--report_to none --use_cpu True",
            base_dir=base_dir,
            data=data,
            out=out,
        ),
    )

    saved = json.loads((out / "generation_config.json").read_text())
    model, tokenizer = load_for_inference(str(out), dtype="float32")
    im_end, end_of_text = tokenizer.convert_tokens_to_ids([IM_END, ENDOFTEXT])
    assert (im_end, end_of_text) == (IM_END_ID, ENDOFTEXT_ID)  # the base gains <|im_start|> 1025, <|im_end|> 1026
    assert (saved["eos_token_id"], saved["pad_token_id"]) == ([im_end, end_of_text], end_of_text)

    seen = {}

    def generate(**kwargs):
        seen.update(kwargs)
        return kwargs["input_ids"]

    model.generate = generate
    generate_reply(model, tokenizer, [{"role": "user", "content": "Hi"}], max_new_tokens=2, temperature=0)
    assert (seen["eos_token_id"], seen["pad_token_id"]) == ([im_end, end_of_text], end_of_text)

    if base == "tiny_chat_model":
        tiny = json.loads((base_dir / "generation_config.json").read_text())
        assert (tiny["eos_token_id"], tiny["pad_token_id"]) == ([im_end, end_of_text], end_of_text)
