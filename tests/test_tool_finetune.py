"""A LoRA run through finetune.py on tool-calling data (ChatML's Qwen2.5 tool format, on the tiny model): saved,
reloaded with plain PEFT, it answers with the tool calls it memorised, with tools in the prompt and without, through
tools/chat.py, and answers from a tool's result."""

import json

import pytest
import torch

from llmft.data.render import render_prompt
from llmft.inference import load_for_inference, stop_token_ids
from tests.conftest import argv, write_records

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
WITH_TOOLS = {
    "tools": [WEATHER],
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
        },
        {"role": "tool", "content": "18"},
        {"role": "assistant", "content": "It is 18 degrees."},
    ],
}
WITHOUT_TOOLS = {
    "conversations": [  # LLaMA-Factory's shape, no tools given
        {"from": "human", "value": "What time is it?"},
        {"from": "function_call", "value": json.dumps({"name": "get_time", "arguments": {"zone": "UTC"}})},
    ]
}


def generate(model, tokenizer, messages, tools=None, max_new_tokens=100) -> str:
    prompt = torch.tensor([render_prompt(messages, tokenizer, tools)])
    with torch.inference_mode():
        output = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=stop_token_ids(tokenizer, model),
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(output[0, prompt.shape[1] :], skip_special_tokens=True)


@pytest.mark.slow  # about 35 s on two CPU cores: the tool-call JSON is ~50 tokens to memorise
def test_lora_learns_tool_calls_and_chat_answers_with_them(tiny_chat_model, tmp_path, run_finetune, capsys):
    records = [{"id": f"w{i}", **WITH_TOOLS} for i in range(4)] + [{"id": f"t{i}", **WITHOUT_TOOLS} for i in range(4)]
    data = write_records(tmp_path / "tools.jsonl", records, jsonl=True)
    out = tmp_path / "adapter"
    trainer = run_finetune(
        *argv(
            "--model_name_or_path {model} --data_path {data} --output_dir {out} --use_lora True --lora_r 16",
            "--lora_alpha 32 --max_steps 160 --per_device_train_batch_size 8 --learning_rate 3e-3",
            "--lr_scheduler_type constant --save_strategy no --logging_steps 10 --report_to none --seed 0",
            model=tiny_chat_model,
            data=data,
            out=out,
        ),
    )
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    # LoRA cannot grow the tiny model's random, tied embeddings, so its loss floors near 4.4 nats while the greedy
    # answers below are already right
    assert losses[-1] < 0.8 * losses[0], losses
    assert (out / "adapter_model.safetensors").is_file()

    model, tokenizer = load_for_inference(str(out), dtype="float32")  # plain PEFT over the recorded base
    call = generate(model, tokenizer, [{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER])
    assert call == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    body = json.loads(call.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>"))
    assert body == {"name": "get_weather", "arguments": {"city": "Paris"}}  # what a serving stack parses
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "18"},
    ]
    assert generate(model, tokenizer, history, tools=[WEATHER]) == "It is 18 degrees."

    from llmft.tools.chat import main as chat

    capsys.readouterr()
    chat(["--model", str(out), "--prompt", "What time is it?", "--temperature", "0", "--max_new_tokens", "100"])
    assert capsys.readouterr().out.strip() == (
        '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    )
