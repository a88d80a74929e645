"""tools/chat.py and llmft.inference: any result loads, replies stop at the end-of-turn token, the CLI works one-shot
and interactively.

A tiny model is fine-tuned here until it answers every prompt with ANSWER, so replies can be compared exactly.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmft.chat_template import ENDOFTEXT, IM_END
from llmft.data.records import parse_record
from llmft.data.render import render_conversation
from llmft.inference import Reply, generate_reply, load_for_inference
from llmft.tools.merge import merge_lora
from tests.conftest import argv

REPO = Path(__file__).resolve().parent.parent
ANSWER = "Hello world."
PROMPTS = ["hi", "What is the capital of France?", "Please write a short poem about the sea.", "Yes. No. Maybe."]


def answer_samples(tokenizer):
    records = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": ANSWER}]} for p in PROMPTS
    ]
    return [render_conversation(parse_record(r), tokenizer) for r in records]


def train(model, tokenizer, steps: int, lr: float) -> None:
    """Full-batch AdamW on the answer samples, right-padded into one batch."""
    samples = answer_samples(tokenizer)
    width = max(len(s.input_ids) for s in samples)
    pad = [width - len(s.input_ids) for s in samples]
    input_ids = torch.tensor([s.input_ids + [tokenizer.pad_token_id] * n for s, n in zip(samples, pad)])
    labels = torch.tensor([s.labels + [-100] * n for s, n in zip(samples, pad)])
    attention_mask = torch.tensor([[1] * len(s.input_ids) + [0] * n for s, n in zip(samples, pad)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.fixture(scope="session")
def answering_model(tiny_chat_model, tmp_path_factory) -> Path:
    """A full fine-tune that answers ANSWER to anything. Its saved generation config stops only at <|endoftext|>,
    so stopping at <|im_end|> must come from generate_reply itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    train(model, tokenizer, steps=30, lr=3e-3)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    path = tmp_path_factory.mktemp("chat") / "answering"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def answering_adapter(answering_model, tmp_path_factory) -> Path:
    """A LoRA adapter (trained a little further on the same data) over the answering model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(answering_model)
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(answering_model),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    train(model, tokenizer, steps=2, lr=1e-3)
    path = tmp_path_factory.mktemp("chat") / "adapter"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def answering_merged(answering_adapter, tmp_path_factory) -> Path:
    return merge_lora(answering_adapter, tmp_path_factory.mktemp("chat") / "merged").output_dir


def run_chat(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "tools/chat.py", *args], cwd=REPO, input=stdin, capture_output=True, text=True, timeout=600
    )


def test_reply_stops_at_end_of_turn(answering_model):
    model, tokenizer = load_for_inference(answering_model)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids(ENDOFTEXT)

    reply = generate_reply(
        model, tokenizer, [{"role": "user", "content": "tell me a joke"}], temperature=0, max_new_tokens=20
    )
    assert reply == Reply(ANSWER, tokenizer(ANSWER, add_special_tokens=False)["input_ids"], finished=True)
    assert im_end not in reply.token_ids and IM_END not in reply.text

    # Without the explicit stop the saved config lets generation run on past <|im_end|>.
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "tell me a joke"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    raw = model.generate(**prompt, max_new_tokens=20, do_sample=False)[0, prompt["input_ids"].shape[1] :].tolist()
    assert im_end in raw and raw.index(im_end) < len(raw) - 1


def test_reply_cut_by_max_new_tokens(answering_model):
    model, tokenizer = load_for_inference(answering_model)
    reply = generate_reply(model, tokenizer, [{"role": "user", "content": "hi"}], temperature=0, max_new_tokens=2)
    assert not reply.finished
    assert reply.token_ids == tokenizer(ANSWER, add_special_tokens=False)["input_ids"][:2]


def test_greedy_replies_are_identical(tiny_chat_model):
    model, tokenizer = load_for_inference(tiny_chat_model)  # untrained: any sampling would show
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    replies = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        replies.append(generate_reply(model, tokenizer, messages, temperature=0, max_new_tokens=12))
    assert replies[0] == replies[1] and len(replies[0].token_ids) > 0


def test_loads_adapter_and_merged_folders(answering_adapter, answering_merged):
    from peft import PeftModel

    for path, kind in ((answering_adapter, PeftModel), (answering_merged, torch.nn.Module)):
        model, tokenizer = load_for_inference(path)
        assert isinstance(model, kind) and not model.training
        assert tokenizer.chat_template
        for prompt in ("hi", "How are you?"):
            reply = generate_reply(
                model, tokenizer, [{"role": "user", "content": prompt}], temperature=0, max_new_tokens=20
            )
            assert reply.text == ANSWER and reply.finished


@pytest.mark.slow
def test_one_shot_prompt_prints_only_the_reply(answering_adapter):
    proc = run_chat(
        "--model", str(answering_adapter), "--prompt", "Who are you?", "--temperature", "0", "--max_new_tokens", "20"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ANSWER + "\n"


@pytest.mark.slow
def test_interactive_session_over_stdin(answering_merged):
    proc = run_chat(
        *argv(
            "--model {answering_merged} --temperature 0 --max_new_tokens 20 --system 'You are terse.'",
            answering_merged=answering_merged,
        ),
        stdin="hi\n/reset\nWhat is the capital of France?\n/exit\nnot read\n",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [ANSWER, ANSWER]
    assert "conversation cleared" in proc.stderr


def test_end_of_input_ends_the_session(answering_merged, monkeypatch, capsys):
    from llmft.tools.chat import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n\n"))
    main(["--model", str(answering_merged), "--temperature", "0", "--max_new_tokens", "20"])
    assert capsys.readouterr().out == ANSWER + "\n"


def test_history_and_reset(answering_model, monkeypatch):
    import llmft.tools.chat as chat
    from transformers import AutoTokenizer

    seen = []

    def fake_reply(model, tokenizer, messages, **sampling):
        seen.append([m["content"] for m in messages])
        return Reply(f"answer {len(seen)}", [], True)

    monkeypatch.setattr(chat, "generate_reply", fake_reply)
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\nsecond\n/reset\nthird\n/exit\nnever\n"))
    chat.chat_loop(None, AutoTokenizer.from_pretrained(answering_model), system="sys", max_new_tokens=5)
    assert seen == [
        ["sys", "first"],
        ["sys", "first", "answer 1", "second"],
        ["sys", "third"],
    ]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature", "-1"], "--temperature -1.0"),
        (["--top_p", "0"], "--top_p 0.0"),
        (["--max_new_tokens", "0"], "--max_new_tokens 0"),
    ],
)
def test_bad_sampling_flags_exit_2(flags, message, tmp_path, capsys):
    from llmft.tools.chat import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path), *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_model_exits_2(tmp_path, capsys):
    from llmft.tools.chat import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path / "nothing"), "--prompt", "hi"])
    assert exit_info.value.code == 2
    assert f"error: --model {tmp_path / 'nothing'}: no such directory\n" in capsys.readouterr().err


@pytest.mark.parametrize("cut", [100_000, 7], ids=["truncated", "shorter-than-its-header-length"])
def test_truncated_weights_are_named(tiny_chat_model, tmp_path, capsys, cut):
    """Before, a cut-off model.safetensors failed inside from_pretrained with a traceback naming no file."""
    import shutil

    from llmft.tools.chat import main

    model = shutil.copytree(tiny_chat_model, tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:cut])
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(model), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert f"error: --model {model}: {weights} " in err


def test_truncated_adapter_weights_are_named(answering_adapter, tmp_path, capsys):
    import shutil

    from llmft.tools.chat import main

    adapter = shutil.copytree(answering_adapter, tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(adapter), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert f"error: --model {adapter}: {weights} is not a readable safetensors file" in err


# --- --tools: function schemas in the prompt, as training shows them ----------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TIME = {"name": "get_time", "description": "Time in a zone", "parameters": {"type": "object", "properties": {}}}
NO_TOOL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_json(path: Path, value) -> Path:
    import json

    path.write_text(json.dumps(value))
    return path


def recording_generate(monkeypatch) -> list[list[int]]:
    """The prompt ids of every generate call of a model tools/chat.py loads."""
    import llmft.tools.chat as chat

    prompts, load = [], chat.load_for_inference

    def load_recording(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        generate = model.generate

        def record(**kw):
            prompts.append(kw["input_ids"][0].tolist())
            return generate(**kw)

        model.generate = record
        return model, tokenizer

    monkeypatch.setattr(chat, "load_for_inference", load_recording)
    return prompts


def test_tools_are_prompted_exactly_as_training_renders_them(answering_model, tmp_path, monkeypatch, capsys):
    """The prompt chat.py generates from is, token for token, the prompt of a training record with the same tools
    (an OpenAI schema and a bare LLaMA-Factory function, which training wraps), system prompt and user turn."""
    from transformers import AutoTokenizer

    from llmft.tools.chat import main

    prompts = recording_generate(monkeypatch)
    tools = write_json(tmp_path / "tools.json", [WEATHER, TIME])
    flags = argv(
        "--model {model} --system 'Be brief.' --prompt 'Weather in Paris?' --temperature 0",
        "--max_new_tokens 5",
        model=answering_model,
    )
    main([*flags, "--tools", str(tools)])
    main(flags)
    assert capsys.readouterr().out.count("\n") == 2

    tokenizer = AutoTokenizer.from_pretrained(answering_model)
    record = {
        "tools": [WEATHER, TIME],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "It is sunny."},
        ],
    }
    sample = render_conversation(parse_record(record), tokenizer)
    trained_from = next(i for i, label in enumerate(sample.labels) if label != -100)
    assert prompts[0] == sample.input_ids[:trained_from]
    shown = tokenizer.decode(prompts[0])
    assert "<tools>" in shown and '"name": "get_weather"' in shown and '"name": "get_time"' in shown
    assert "<tools>" not in tokenizer.decode(prompts[1])  # without --tools none are shown


def test_interactive_turns_all_show_the_tools(answering_model, tmp_path, monkeypatch, capsys):
    import llmft.tools.chat as chat

    seen = []

    def fake_reply(model, tokenizer, messages, tools=None, **sampling):
        seen.append(tools)
        return Reply("ok", [], True)

    monkeypatch.setattr(chat, "generate_reply", fake_reply)
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\n/reset\nsecond\n"))
    chat.main(["--model", str(answering_model), "--tools", str(write_json(tmp_path / "t.json", [WEATHER]))])
    assert seen == [[WEATHER], [WEATHER]]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ("[{", "not a readable JSON file"),
        ('{"name": "get_weather"}', "'tools' must be a list of function schemas, got dict"),
        ('[{"type": "function", "function": {"description": "no name"}}]', "tool 0 must be a function schema"),
        ("[]", "the file lists no function schemas"),
    ],
)
def test_bad_tools_file_exits_2_before_loading(content, message, tmp_path, capsys):
    from llmft.tools.chat import main

    path = tmp_path / "tools.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path / "no-model"), "--tools", str(path), "--prompt", "hi"])  # refused before it
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert f"--tools {path}" in err and message in err


def test_template_that_ignores_tools_is_refused(answering_model, tmp_path, capsys):
    import shutil

    from transformers import AutoTokenizer

    from llmft.tools.chat import main

    model = shutil.copytree(answering_model, tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = NO_TOOL_TEMPLATE
    tokenizer.save_pretrained(model)
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(model), "--tools", str(write_json(tmp_path / "t.json", [WEATHER])), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "the model's chat template does not show the tools ('get_weather')" in err


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"r": 8}, "does not load onto its base"),
        ({"target_modules": ["no_such_proj"]}, "does not load onto its base"),
        ({"peft_type": "BOGUS"}, "is not usable: peft_type 'BOGUS' is not one PEFT knows"),
    ],
    ids=["rank", "target-modules", "peft-type"],
)
def test_an_adapter_that_does_not_fit_its_base_is_named(answering_adapter, tmp_path, capsys, config, message):
    """Before, PEFT's KeyError or size-mismatch traceback."""
    import json
    import shutil

    from llmft.tools.chat import main

    adapter = shutil.copytree(answering_adapter, tmp_path / "adapter")
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(adapter), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert f"error: the adapter {adapter} {message}" in err
