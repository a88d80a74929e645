"""Reading conversation files: every accepted record format becomes the right Conversation, read the same from a JSON
list and from JSONL, and every bad file or record is a DataError whose message names the file and the record (its
position, its line in JSONL, its id when it has one)."""

import json

import pytest

from llmft.data.conversation import ASSISTANT, SYSTEM, TOOL, USER, Conversation, Message, ToolCall
from llmft.data.records import load_conversations, parse_record
from llmft.errors import DataError
from tests.conftest import chat_record, write_records

S, U, A, T = SYSTEM, USER, ASSISTANT, TOOL

# Every test file starts with this record, so the record under test is #1 and its default id is "1", not "0".
FILLER = chat_record("Hi", "Hello!", id="filler")
FILLER_CONVERSATION = Conversation("filler", (Message(U, "Hi"), Message(A, "Hello!")))


def conversation(id, *messages, text=None, tools=()):
    """A Conversation from (role, content) pairs or whole Messages."""
    return Conversation(id, tuple(m if isinstance(m, Message) else Message(*m) for m in messages), text, tools)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


FORMATS = {
    "qwen-with-system-turn": (
        {
            "id": "q-1",
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "user", "value": "What is 2 + 3?"},
                {"from": "assistant", "value": "5."},
                {"from": "user", "value": "And 7 times 6?"},
                {"from": "assistant", "value": "42."},
            ],
        },
        conversation("q-1", (S, "Be brief."), (U, "What is 2 + 3?"), (A, "5."), (U, "And 7 times 6?"), (A, "42.")),
    ),
    "qwen-record-level-system": (
        {
            "id": "q-2",
            "system": "You are Pico.",
            "conversations": [{"from": "user", "value": "Who are you?"}, {"from": "assistant", "value": "Pico."}],
        },
        conversation("q-2", (S, "You are Pico."), (U, "Who are you?"), (A, "Pico.")),
    ),
    "qwen-empty-record-level-system-adds-nothing": (
        {"system": "", "conversations": [{"from": "user", "value": "a"}, {"from": "assistant", "value": "b"}]},
        conversation("1", (U, "a"), (A, "b")),
    ),
    "sharegpt-human-gpt": (
        {
            "conversations": [
                {"from": "human", "value": "Hello"},
                {"from": "gpt", "value": "Hi there."},
                {"from": "Human", "value": "Bye"},
                {"from": "GPT", "value": "Goodbye."},
            ]
        },
        conversation("1", (U, "Hello"), (A, "Hi there."), (U, "Bye"), (A, "Goodbye.")),
    ),
    "openai-messages": (
        {
            "id": 17,
            "messages": [
                {"role": "system", "content": "Answer in French."},
                {"role": "user", "content": "Thank you"},
                {"role": "assistant", "content": "Merci"},
            ],
        },
        conversation("17", (S, "Answer in French."), (U, "Thank you"), (A, "Merci")),
    ),
    "alpaca-instruction-input-output": (
        {"instruction": "Translate into German.", "input": "I like green apples.", "output": "Ich mag gruene Aepfel."},
        conversation("1", (U, "Translate into German.\n\nI like green apples."), (A, "Ich mag gruene Aepfel.")),
    ),
    "alpaca-empty-input-and-system": (
        {"id": "al-2", "instruction": "Say hello.", "input": "", "output": "Hello!", "system": "Be cheerful."},
        conversation("al-2", (S, "Be cheerful."), (U, "Say hello."), (A, "Hello!")),
    ),
    "plain-text": (
        {"id": "doc-1", "text": "Once upon a time, a little robot lived in a quiet village."},
        conversation("doc-1", text="Once upon a time, a little robot lived in a quiet village."),
    ),
    "openai-content-as-text-parts": (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "First part."}, {"type": "text", "value": "Second."}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "Answer."}]},
            ]
        },
        conversation("1", (U, "First part.\nSecond."), (A, "Answer.")),
    ),
    "openai-tools-single-and-parallel-calls": (
        {
            "id": "tc",
            "tools": [WEATHER, TIME],
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "18C, sunny"},
                {"role": "assistant", "content": "18C and sunny."},
                {"role": "user", "content": "And Rome, and the time?"},
                {
                    "role": "assistant",
                    "content": "Checking.",
                    "tool_calls": [
                        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
                        {"type": "function", "function": {"name": "get_time", "arguments": {}}},
                    ],
                },
                {"role": "tool", "name": "get_weather", "content": "22C"},
                {"role": "tool", "content": "12:00"},
                {"role": "assistant", "content": "22C in Rome; it is noon."},
            ],
        },
        conversation(
            "tc",
            (U, "Weather in Paris?"),
            Message(A, "", tool_calls=(ToolCall("get_weather", {"city": "Paris"}, "c1"),)),
            Message(T, "18C, sunny", tool_call_id="c1"),
            (A, "18C and sunny."),
            (U, "And Rome, and the time?"),
            Message(A, "Checking.", tool_calls=(ToolCall("get_weather", {"city": "Rome"}), ToolCall("get_time", {}))),
            Message(T, "22C", name="get_weather"),
            (T, "12:00"),
            (A, "22C in Rome; it is noon."),
            tools=(WEATHER, TIME),
        ),
    ),
    "sharegpt-llamafactory-function-call-and-observation": (
        {
            "tools": json.dumps([WEATHER["function"]]),
            "conversations": [
                {"from": "human", "value": "Weather in Oslo and Bergen?"},
                {
                    "from": "function_call",
                    "value": json.dumps(
                        [
                            {"name": "get_weather", "arguments": {"city": "Oslo"}},
                            {"name": "get_weather", "arguments": '{"city": "Bergen"}'},
                        ]
                    ),
                },
                {"from": "observation", "value": '["-2C", "3C"]'},
                {"from": "gpt", "value": "Oslo -2C, Bergen 3C."},
                {"from": "human", "value": "Thanks. Again for Oslo?"},
                {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})},
                {"from": "observation", "value": "-1C"},
                {"from": "gpt", "value": "Now -1C."},
            ],
        },
        conversation(
            "1",
            (U, "Weather in Oslo and Bergen?"),
            Message(
                A,
                "",
                tool_calls=(ToolCall("get_weather", {"city": "Oslo"}), ToolCall("get_weather", {"city": "Bergen"})),
            ),
            (T, '["-2C", "3C"]'),
            (A, "Oslo -2C, Bergen 3C."),
            (U, "Thanks. Again for Oslo?"),
            Message(A, "", tool_calls=(ToolCall("get_weather", {"city": "Oslo"}),)),
            (T, "-1C"),
            (A, "Now -1C."),
            tools=(WEATHER,),
        ),
    ),
    "tool-call-as-the-last-turn-without-tools": (
        {
            "messages": [
                {"role": "user", "content": "Time?"},
                {"role": "assistant", "tool_calls": [{"function": {"name": "get_time", "arguments": "{}"}}]},
            ]
        },
        conversation("1", (U, "Time?"), Message(A, "", tool_calls=(ToolCall("get_time", {}),))),
    ),
    "openai-reasoning-content": (
        {
            "messages": [
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "reasoning_content": "Two and two.", "content": "4"},
            ]
        },
        conversation("1", (U, "2+2?"), Message(A, "4", reasoning="Two and two.")),
    ),
    "think-block-in-content": (
        {
            "conversations": [
                {"from": "user", "value": "2+3?"},
                {"from": "assistant", "value": "<think>\nTwo and three.\n</think>\n\n5"},
            ]
        },
        conversation("1", (U, "2+3?"), Message(A, "5", reasoning="Two and three.")),
    ),
    "llama-factory-v1-reasoning-and-tool-call-parts": (  # the shape of LLaMA-Factory's reason_tool_use_demo data
        {
            "messages": [
                {"role": "system", "content": [{"type": "text", "value": "Use tools."}]},
                {"role": "user", "content": [{"type": "text", "value": "Areas of radius 1 and 2?"}]},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "reasoning", "value": "Two calls."},
                        {"type": "tool_call", "value": '{"name": "area", "arguments": {"r": 1}}'},
                        {"type": "tool_call", "value": {"name": "area", "arguments": {"r": 2}}},
                    ],
                },
                {"role": "tool", "content": [{"type": "text", "value": "[3.14, 12.57]"}]},
                {
                    "role": "assistant",
                    "content": [{"type": "reasoning", "value": "Round."}, {"type": "text", "value": "3.1 and 12.6."}],
                },
            ],
        },
        conversation(
            "1",
            (S, "Use tools."),
            (U, "Areas of radius 1 and 2?"),
            Message(A, "", tool_calls=(ToolCall("area", {"r": 1}), ToolCall("area", {"r": 2})), reasoning="Two calls."),
            (T, "[3.14, 12.57]"),
            Message(A, "3.1 and 12.6.", reasoning="Round."),
        ),
    ),
    "per-message-train-and-loss-weight": (
        {
            "messages": [
                {"role": "user", "content": "a", "train": False},
                {"role": "assistant", "content": "b", "train": False},
                {"role": "user", "content": "c"},
                {"role": "assistant", "content": "d", "loss_weight": 1.0},
                {"role": "user", "content": "e"},
                {"role": "assistant", "content": "f", "loss_weight": 0},
            ]
        },
        conversation(
            "1",
            (U, "a"),
            Message(A, "b", train=False),
            (U, "c"),
            Message(A, "d", train=True),
            (U, "e"),
            Message(A, "f", train=False),
        ),
    ),
    "plain-text-without-id": (
        {"text": "Water boils at 100 degrees."},
        conversation("1", text="Water boils at 100 degrees."),
    ),
}


def write_jsonl_with_blank_line(path, records):
    """JSONL with a blank line after the first record, so a record's line number is not its index + 1."""
    lines = [json.dumps(r) for r in records]
    path.write_text("\n".join(lines[:1] + [""] + lines[1:]) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("name", FORMATS)
def test_format_becomes_conversation_from_json_list_and_jsonl(tmp_path, name):
    record, expected = FORMATS[name]
    from_list = load_conversations(str(write_records(tmp_path / "data.json", [FILLER, record])))
    from_jsonl = load_conversations(str(write_jsonl_with_blank_line(tmp_path / "data.jsonl", [FILLER, record])))

    assert from_list == [FILLER_CONVERSATION, expected]
    assert from_jsonl == from_list


def test_all_formats_in_one_file_keep_order_and_positional_ids(tmp_path):
    records = [record for record, _ in FORMATS.values()]
    from_list = load_conversations(str(write_records(tmp_path / "mixed.json", records)))
    from_jsonl = load_conversations(str(write_records(tmp_path / "mixed.jsonl", records, jsonl=True)))

    assert from_jsonl == from_list
    for index, (conv, (record, expected)) in enumerate(zip(from_list, FORMATS.values())):
        assert conv.messages == expected.messages and conv.text == expected.text
        assert conv.id == (str(record["id"]) if "id" in record else str(index))
    assert [c.is_plain_text for c in from_list] == [e.text is not None for _, e in FORMATS.values()]


@pytest.mark.parametrize("name", FORMATS)
def test_canonical_record_reads_back_to_the_same_conversation(name):
    _, expected = FORMATS[name]
    assert parse_record(json.loads(json.dumps(expected.to_record()))) == expected


def test_default_system_fills_in_only_a_missing_system_message():
    with_system = FORMATS["qwen-with-system-turn"][1]
    without = FORMATS["sharegpt-human-gpt"][1]
    assert with_system.as_dicts("Other")[0] == {"role": S, "content": "Be brief."}
    assert without.as_dicts("Other") == [{"role": S, "content": "Other"}] + without.as_dicts()


# --- errors --------------------------------------------------------------------------------------------------------


def turns(*pairs):
    return [{"from": role, "value": value} for role, value in pairs]


def call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def tool_record(tool_call, tools=None, results=1, result_id=None, result_name=None):
    """user -> assistant calling `tool_call` -> `results` tool results -> assistant."""
    result = {"role": "tool", "content": "r"}
    if result_id:
        result["tool_call_id"] = result_id
    if result_name:
        result["name"] = result_name
    record = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "tool_calls": [tool_call]},
            *[result] * results,
            {"role": "assistant", "content": "b"},
        ]
    }
    if tools is not None:
        record["tools"] = tools
    return record


# (bad record, a fragment the message must contain); each bad record is written as record #2 of its file.
BAD_RECORDS = {
    "not-an-object-list": (["user", "hi"], "expected a JSON object, got list"),
    "not-an-object-string": ("hello", "expected a JSON object, got str"),
    "turn-missing-value": (
        {"conversations": [{"from": "user"}, {"from": "assistant", "value": "b"}]},
        "turn 0 needs 'from' and 'value'",
    ),
    "turn-missing-role": (
        {"messages": [{"content": "a"}, {"role": "assistant", "content": "b"}]},
        "turn 0 needs 'from' and 'value' (or 'role' and 'content')",
    ),
    "alpaca-without-output": ({"instruction": "Do it."}, "unknown record format"),
    "alpaca-empty-output": ({"instruction": "Do it.", "output": "  "}, "needs a non-empty 'instruction' and 'output'"),
    "alpaca-null-output": ({"instruction": "Do it.", "output": None}, "needs a non-empty 'instruction' and 'output'"),
    "alpaca-null-instruction": (
        {"instruction": None, "output": "Done."},
        "needs a non-empty 'instruction' and 'output'",
    ),
    "alpaca-non-string-input": ({"instruction": "Add.", "input": [1, 2], "output": "3"}, "'input' must be a string"),
    "turns-not-a-list": ({"conversations": "user: hi"}, "'conversations' must be a list of turns"),
    "turn-not-an-object": ({"messages": ["hi", "hello"]}, "turn 0 must be an object"),
    "unknown-role": ({"conversations": turns(("user", "a"), ("narrator", "b"))}, "turn 1: unknown role 'narrator'"),
    "empty-conversation": ({"conversations": []}, "empty conversation"),
    "only-a-system-turn": ({"conversations": turns(("system", "s"))}, "empty conversation"),
    "no-assistant-turn": ({"conversations": turns(("user", "a"))}, "no assistant turn"),
    "two-user-turns-in-a-row": (
        {"conversations": turns(("user", "a"), ("user", "b"), ("assistant", "c"))},
        "turn 1: expected a assistant turn, got user",
    ),
    "starts-with-assistant": (
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
        "turn 0: expected a user turn, got assistant",
    ),
    "system-turn-not-first": (
        {"conversations": turns(("user", "a"), ("assistant", "b"), ("system", "s"), ("user", "c"), ("assistant", "d"))},
        "turn 2: a system turn may only come first",
    ),
    "system-field-and-system-turn": (
        {"system": "x", "conversations": turns(("system", "s"), ("user", "a"), ("assistant", "b"))},
        "both a 'system' field and a system turn",
    ),
    "non-string-system-field": (
        {"system": 3, "conversations": turns(("user", "a"), ("assistant", "b"))},
        "'system' must be a string",
    ),
    "non-string-content": (
        {"conversations": turns(("user", 42), ("assistant", "b"))},
        "turn 0: content must be a string or a list of text parts, got int",
    ),
    "content-not-text": (
        {"conversations": turns(("user", {"text": "a"}), ("assistant", "b"))},
        "turn 0: content must be a string or a list of text parts, got dict",
    ),
    "content-image-part": (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
                {"role": "assistant", "content": "b"},
            ]
        },
        "turn 0: content part 0 (type 'image_url') is not a text part",
    ),
    **{
        f"tool-{name}": value
        for name, value in {
            "arguments-not-json": (
                tool_record(call("get_weather", '{"city": Paris}')),
                "turn 1: tool call 0 ('get_weather'): arguments are not valid JSON (Expecting value "
                "at column 10): '{\"city\": Paris}'",
            ),
            "arguments-not-an-object": (
                tool_record(call("get_weather", '["Paris"]')),
                "turn 1: tool call 0 ('get_weather'): arguments must be a JSON object, got list",
            ),
            "call-without-arguments": (
                tool_record({"type": "function", "function": {"name": "get_weather"}}),
                "turn 1: tool call 0 ('get_weather') has no 'arguments'",
            ),
            "call-without-name": (
                tool_record({"function": {"arguments": "{}"}}),
                "turn 1: tool call 0 needs a function 'name'",
            ),
            "unknown-tool": (
                tool_record(call("get_wether", "{}"), tools=[WEATHER]),
                "turn 1 calls 'get_wether', which the record's tools do not define (they define 'get_weather')",
            ),
            "result-without-call": (
                {
                    "messages": [
                        {"role": "user", "content": "a"},
                        {"role": "tool", "content": "r"},
                        {"role": "assistant", "content": "b"},
                    ]
                },
                "turn 1: a tool result with no tool call before it",
            ),
            "result-after-a-plain-answer": (
                {
                    "messages": [
                        {"role": "user", "content": "a"},
                        {"role": "assistant", "content": "b"},
                        {"role": "tool", "content": "r"},
                    ]
                },
                "turn 2: a tool result with no tool call before it",
            ),
            "more-results-than-calls": (
                tool_record(call("get_weather", "{}"), results=2),
                "turn 3: 2 tool results answer turn 1's 1 tool call",
            ),
            "call-without-result": (
                {
                    "messages": [
                        {"role": "user", "content": "a"},
                        {"role": "assistant", "tool_calls": [call("get_weather", "{}")]},
                        {"role": "user", "content": "b"},
                        {"role": "assistant", "content": "c"},
                    ]
                },
                "turn 2: the tool calls of turn 1 have no result (expected a tool turn, got user)",
            ),
            "result-id-matches-no-call": (
                tool_record({**call("get_weather", "{}"), "id": "c1"}, result_id="c2"),
                "turn 2: tool_call_id 'c2' matches no call of turn 1 (its ids: 'c1')",
            ),
            "result-names-another-function": (
                tool_record(call("get_weather", "{}"), result_name="get_time"),
                "turn 2: a result of 'get_time', which turn 1 does not call",
            ),
            "function-call-value-not-json": (
                {
                    "conversations": [
                        {"from": "human", "value": "a"},
                        {"from": "function_call", "value": "get_weather(Paris)"},
                        {"from": "observation", "value": "r"},
                        {"from": "gpt", "value": "b"},
                    ]
                },
                "turn 1: a function_call value must be JSON",
            ),
            "tools-string-not-json": (
                {**tool_record(call("get_weather", "{}")), "tools": "[{name: x}]"},
                "'tools' is a string but not valid JSON",
            ),
            "tool-schema-without-name": (
                {**tool_record(call("get_weather", "{}")), "tools": [{"type": "function"}]},
                "tool 0 must be a function schema with a name",
            ),
            "tool-calls-on-a-user-turn": (
                {
                    "messages": [
                        {"role": "user", "content": "a", "tool_calls": [call("x", "{}")]},
                        {"role": "assistant", "content": "b"},
                    ]
                },
                "turn 0: only assistant turns may have 'tool_calls'",
            ),
        }.items()
    },
    "reasoning-part-on-a-user-turn": (
        {
            "messages": [
                {"role": "user", "content": [{"type": "reasoning", "value": "r"}, {"type": "text", "value": "a"}]},
                {"role": "assistant", "content": "b"},
            ]
        },
        "turn 0: only assistant turns may have content parts of type 'reasoning'",
    ),
    "tool-call-part-not-json": (
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": [{"type": "tool_call", "value": "area(1)"}]},
            ]
        },
        "turn 1: content part 0: a function_call value must be JSON",
    ),
    "reasoning-twice": (
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "reasoning_content": "r", "content": "<think>r</think>b"},
            ]
        },
        "turn 1: has both 'reasoning_content' and a <think> block in its content",
    ),
    "think-not-closed": (
        {"conversations": turns(("user", "a"), ("assistant", "<think>hmm"))},
        "turn 1: <think> without </think>",
    ),
    "text-before-think": (
        {"conversations": turns(("user", "a"), ("assistant", "So <think>r</think> b"))},
        "turn 1: text before <think>",
    ),
    "loss-weight-not-0-or-1": (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "loss_weight": 0.5}]},
        "turn 1: loss_weight 0.5 is not supported: use 1 (trained) or 0 (not trained); "
        "weighted loss is not implemented",
    ),
    "train-not-a-bool": (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "train": "yes"}]},
        "turn 1: 'train' must be true or false, got 'yes'",
    ),
    "train-contradicts-loss-weight": (
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b", "train": True, "loss_weight": 0},
            ]
        },
        "turn 1: 'train' true contradicts loss_weight 0",
    ),
    "user-turn-trained": (
        {"messages": [{"role": "user", "content": "a", "train": True}, {"role": "assistant", "content": "b"}]},
        "turn 0: only assistant turns can be trained, not a user turn",
    ),
    "nothing-trained": (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "train": False}]},
        "every assistant turn says train false (or loss_weight 0), so nothing to train on",
    ),
    "empty-text": ({"text": "   "}, "'text' must be a non-empty string"),
    "null-content": (
        {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "b"}]},
        "turn 0: 'content' is null; a turn needs a role and its text as a string",
    ),
    "null-value-and-role": (
        {"conversations": [{"from": None, "value": None}, {"from": "gpt", "value": "b"}]},
        "turn 0: 'from' and 'value' are null",
    ),
    "empty-user-turn": (
        {"conversations": turns(("user", ""), ("assistant", "b"))},
        "turn 0: the user turn is empty (or whitespace only)",
    ),
    "whitespace-user-turn": (
        {"messages": [{"role": "user", "content": [" ", "\n"]}, {"role": "assistant", "content": "b"}]},
        "turn 0: the user turn is empty (or whitespace only)",
    ),
    "zero-width-answer": (
        {"conversations": turns(("user", "a"), ("assistant", "\u200b\u200b\u2060\ufeff\u3164 "))},
        "turn 1: the assistant turn is empty (or whitespace only): it would train the model to reply with nothing",
    ),
    "zero-width-user-turn": (
        {"conversations": turns(("user", "\u200b\u200c\u200d"), ("assistant", "b"))},
        "turn 0: the user turn is empty (or whitespace only)",
    ),
    "zero-width-text": ({"text": "\u200b\n"}, "'text' must be a non-empty string"),
    "empty-answer": (
        {"conversations": turns(("user", "a"), ("assistant", ""))},
        "turn 1: the assistant turn is empty (or whitespace only): it would train the model to reply with nothing",
    ),
    "whitespace-answer-not-trained": (
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": " \t", "train": False},
                {"role": "user", "content": "c"},
                {"role": "assistant", "content": "d"},
            ]
        },
        "turn 1: the assistant turn is empty",
    ),
    "empty-answer-after-system": (
        {"system": "s", "conversations": turns(("user", "a"), ("assistant", "\n"))},
        "turn 2: the assistant turn is empty",
    ),
    "unknown-record-format": ({"prompt": "a", "completion": "b"}, "unknown record format (keys ["),
}


def load_error(path) -> str:
    with pytest.raises(DataError) as info:
        load_conversations(str(path))
    return str(info.value)


@pytest.mark.parametrize("name", BAD_RECORDS)
def test_bad_record_in_json_list_names_file_and_record(tmp_path, name):
    bad, fragment = BAD_RECORDS[name]
    path = write_records(tmp_path / "data.json", [FILLER, FILLER, bad, FILLER])
    message = load_error(path)
    assert message.startswith(f"{path}: record #2")
    assert fragment in message


@pytest.mark.parametrize("name", BAD_RECORDS)
def test_bad_record_in_jsonl_names_file_record_and_line(tmp_path, name):
    bad, fragment = BAD_RECORDS[name]
    path = write_jsonl_with_blank_line(tmp_path / "data.jsonl", [FILLER, FILLER, bad, FILLER])
    message = load_error(path)
    assert message.startswith(f"{path}: record #2 (line 4)")  # the blank line after record #0 counts as a line
    assert fragment in message


@pytest.mark.parametrize("name", [n for n, (bad, _) in BAD_RECORDS.items() if isinstance(bad, dict)])
@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
def test_bad_record_with_id_is_named_by_its_id(tmp_path, name, jsonl):
    bad, fragment = BAD_RECORDS[name]
    bad = {"id": "bad-7", **bad}
    path = tmp_path / ("data.jsonl" if jsonl else "data.json")
    write_records(path, [FILLER, FILLER, bad], jsonl=jsonl)
    message = load_error(path)
    assert message.startswith(f"{path}: record #2")
    assert "(id 'bad-7')" in message
    assert fragment in message
    if jsonl:
        assert "(line 3)" in message


@pytest.mark.parametrize(
    "bad_id, expected",
    [
        (["a"], "'id' must be a string or a number, got list"),
        (True, "'id' must be a string or a number, got bool"),
        (10**4400, "'id' is a number too long to print"),
    ],
    ids=["list", "bool", "huge-int"],
)
def test_id_that_is_no_name(bad_id, expected):
    with pytest.raises(DataError) as info:
        parse_record({"id": bad_id, "text": "x"}, "data.json: record #3")
    assert str(info.value) == f"data.json: record #3: {expected}"


@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
@pytest.mark.parametrize(
    "record, field",
    [
        (
            {"conversations": [{"from": "user", "value": "a\ud800b"}, {"from": "gpt", "value": "c"}]},
            "conversations[0].value",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": [{"type": "text", "text": "\udfff"}]},
                ]
            },
            "messages[1].content[0].text",
        ),
        ({"text": "a", "meta": {"\ud83d": 1}}, "a key of meta"),
        ({"id": "r\udc00", "text": "a"}, "id"),
    ],
    ids=["value", "text-part", "key", "id"],
)
def test_lone_surrogate_is_named_with_its_field(tmp_path, jsonl, record, field):
    # json.dumps escapes the surrogate (ensure_ascii), as the file a user has would hold it: "\ud800" in the JSON
    path = tmp_path / ("data.jsonl" if jsonl else "data.json")
    if jsonl:
        path.write_text(json.dumps(FILLER) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    else:
        path.write_text(json.dumps([FILLER, record]), encoding="utf-8")
    message = load_error(path)
    assert message.startswith(f"{path}: record #1")
    assert f": {field} holds a lone surrogate " in message
    assert message.endswith("which is not valid Unicode text")


def test_surrogate_pair_escapes_are_one_character_and_fine(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(chat_record("smile", "\U0001f600")) + "\n", encoding="utf-8")
    assert '"\\ud83d\\ude00"' in path.read_text()  # the escape pair, as json.dumps writes it
    assert load_conversations(str(path))[0].messages[1].content == "\U0001f600"


def test_answer_may_be_empty_when_it_calls_tools_or_holds_reasoning():
    with_calls = parse_record(tool_record(call("get_weather", "{}")))
    assert with_calls.messages[1].content == "" and with_calls.messages[1].tool_calls
    reasoning_only = parse_record(
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>r</think>"}]}
    )
    assert reasoning_only.messages[1] == Message(A, "", reasoning="r")


def test_empty_system_and_tool_turns_are_kept():
    record = {
        "messages": [
            {"role": "system", "content": ""},
            {"role": "user", "content": "a"},
            {"role": "assistant", "tool_calls": [call("get_weather", "{}")]},
            {"role": "tool", "content": ""},
            {"role": "assistant", "content": "b"},
        ]
    }
    messages = parse_record(record).messages
    assert messages[0] == Message(S, "") and messages[3] == Message(T, "")


def test_alpaca_null_output_is_a_data_error(tmp_path):
    path = write_records(tmp_path / "data.jsonl", [FILLER, {"instruction": "Do it.", "output": None}], jsonl=True)
    assert load_error(path) == (
        f"{path}: record #1 (line 2): Alpaca record needs a non-empty 'instruction' and 'output'"
    )


def test_unknown_record_format_lists_its_keys_and_the_accepted_ones(tmp_path):
    path = write_records(tmp_path / "data.json", [{"prompt": "a", "completion": "b"}])
    assert load_error(path) == (
        f"{path}: record #0: unknown record format (keys ['completion', 'prompt']); expected 'conversations', "
        "'messages', 'instruction'+'output' or 'text'"
    )


def test_only_the_first_bad_record_is_reported(tmp_path):
    path = write_records(tmp_path / "data.json", [FILLER, {"text": ""}, {"conversations": []}])
    message = load_error(path)
    assert message.startswith(f"{path}: record #1:")
    assert "record #2" not in message


def test_malformed_json_list_names_line_and_column(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"text": "fine"},\n  {"text": "missing quote},\n  {"text": "x"}\n]\n', encoding="utf-8")
    message = load_error(path)
    assert message.startswith(f"{path}: malformed JSON at line 3, column ")
    column = int(message.split("column ")[1].split(":")[0])
    assert 1 <= column <= len('  {"text": "missing quote},') + 1


def test_malformed_json_list_trailing_comma(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[{"text": "a"},\n {"text": "b"},\n]', encoding="utf-8")
    message = load_error(path)
    assert message.startswith(f"{path}: malformed JSON at line 3, column 1:")


def test_malformed_jsonl_names_line_and_record(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c",}\n{"text": "d"}\n', encoding="utf-8")
    message = load_error(path)
    assert message.startswith(f"{path}: line 4 (record #2): malformed JSON: ")
    assert message.endswith("at column 14")  # the "}" after the trailing comma


def test_malformed_jsonl_with_an_open_string_says_at_once(tmp_path):
    # json's message for it ends in "starting at"; the column follows it without a second "at"
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b}\n', encoding="utf-8")
    assert load_error(path) == f"{path}: line 2 (record #1): malformed JSON: Unterminated string starting at column 10"


def test_pretty_printed_json_object_is_not_a_list(tmp_path):
    # A file that does not start with "[" is read as JSONL; a pretty-printed object is named as what it is, not as
    # "line 1: malformed JSON".
    path = tmp_path / "data.json"
    text = json.dumps({"conversations": turns(("user", "a"), ("assistant", "b"))}, indent=1)
    path.write_text(text, encoding="utf-8")
    assert load_error(path) == (
        f"{path}: line 1 (record #0): the file is one whole JSON document spread over lines 1-{text.count(chr(10)) + 1} "
        "(pretty-printed JSON), neither a JSON list of records nor JSONL: give a list ([{...}, {...}]), or JSONL with "
        "each record on one line"
    )


def test_pretty_printed_records_in_jsonl_name_the_lines_they_spread_over(tmp_path):
    path = tmp_path / "data.jsonl"
    pretty = json.dumps(chat_record("a", "b", id="p"), indent=2)
    path.write_text(json.dumps(FILLER) + "\n" + pretty + "\n" + pretty + "\n", encoding="utf-8")
    last = 2 + pretty.count("\n")
    assert load_error(path) == (
        f"{path}: line 2 (record #1): a JSON record spread over lines 2-{last} "
        "(pretty-printed JSON): in JSONL each record must be on one line"
    )


def test_line_cut_short_without_a_continuation_is_still_malformed_json(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(FILLER) + '\n{"text": "cut\n{"text": "x"}\n', encoding="utf-8")
    assert load_error(path).startswith(f"{path}: line 2 (record #1): malformed JSON: Unterminated string")


@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
def test_json_beyond_pythons_limits_is_a_data_error(tmp_path, jsonl):
    deep = "[" * 100_000 + "]" * 100_000
    huge = "9" * 5000
    records = [f'{{"text": "a", "x": {deep}}}', f'{{"text": "a", "x": {huge}}}']
    for i, record in enumerate(records):
        path = tmp_path / f"data{i}.{'jsonl' if jsonl else 'json'}"
        path.write_text(record + "\n" if jsonl else f"[{record}]", encoding="utf-8")
        assert "unreadable JSON: " in load_error(path)


def test_json_list_with_no_records(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(" [ ]\n", encoding="utf-8")
    assert load_error(path) == f"{path}: the file holds an empty JSON list: no records to train on"


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "data.json"
    assert load_error(path) == f"{path}: no such file"


def test_directory_is_not_a_file(tmp_path):
    assert load_error(tmp_path) == (
        f"{tmp_path}: is a directory, not a data file (give the path of a .json or .jsonl file)"
    )


def test_file_that_cannot_be_opened(tmp_path, monkeypatch):
    # Tests run as root, whom file modes do not stop: make open() itself fail, as it does for a user without read
    # permission.
    import builtins

    path = write_records(tmp_path / "data.json", [FILLER])
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    assert load_error(path) == f"{path}: cannot be read: Permission denied"


@pytest.mark.parametrize("content", ["", "\n\n  \t\n"], ids=["empty", "whitespace"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "data.jsonl"
    path.write_text(content, encoding="utf-8")
    assert load_error(path) == f"{path}: the file is empty"


# --- encodings -----------------------------------------------------------------------------------------------------

BOM = "\ufeff".encode("utf-8")


@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
def test_utf8_byte_order_mark_is_skipped(tmp_path, jsonl):
    records = [FILLER, {"id": "cafe", "text": "café"}]
    plain = write_records(tmp_path / ("plain.jsonl" if jsonl else "plain.json"), records, jsonl=jsonl)
    with_bom = tmp_path / ("bom.jsonl" if jsonl else "bom.json")
    with_bom.write_bytes(BOM + plain.read_bytes())
    expected = [FILLER_CONVERSATION, conversation("cafe", text="café")]
    assert load_conversations(str(plain)) == load_conversations(str(with_bom)) == expected


def test_byte_order_mark_before_whitespace_and_a_json_list(tmp_path):
    path = tmp_path / "data.json"
    path.write_bytes(BOM + b"\n  " + json.dumps([FILLER]).encode("utf-8"))
    assert load_conversations(str(path)) == [FILLER_CONVERSATION]


def test_byte_order_mark_alone_is_an_empty_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(BOM + b"\n\n")
    assert load_error(path) == f"{path}: the file is empty"


def latin1(text: str) -> bytes:
    return text.encode("latin-1")


def test_not_utf8_at_the_start(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(latin1('{"text": "café"}\n'))
    # the byte of é in Latin-1 (0xE9) opens a 3-byte UTF-8 sequence that the closing quote cannot continue
    assert load_error(path) == f"{path}: line 1: not UTF-8 text (invalid continuation byte at byte 13)"


def test_not_utf8_in_jsonl_names_the_line_blank_lines_counted(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(FILLER).encode("utf-8") + b"\n\n" + latin1('{"id": "x", "text": "café"}\n'))
    assert load_error(path) == f"{path}: line 3: not UTF-8 text (invalid continuation byte at byte 24)"


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_utf16_file_is_not_utf8(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(json.dumps([FILLER] if suffix == ".json" else FILLER).encode("utf-16"))  # with its own BOM
    # not starting with "[" (the UTF-16 BOM comes first), it is read as JSONL
    assert load_error(path) == f"{path}: line 1: not UTF-8 text (invalid start byte at byte 0)"


@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
def test_not_utf8_after_the_first_8k_is_a_data_error(tmp_path, jsonl):
    good = [{"text": f"sample {i} " + "x" * 40} for i in range(400)]  # ~20 KB of valid UTF-8 first
    path = write_records(tmp_path / ("data.jsonl" if jsonl else "data.json"), good + [{"text": "café"}], jsonl=jsonl)
    raw = path.read_bytes().replace("café".encode("utf-8"), latin1("café"))
    path.write_bytes(raw)
    if jsonl:
        expected = f"{path}: line 401: not UTF-8 text (invalid continuation byte at byte 13)"
    else:  # a JSON list is decoded whole: the message gives the byte's offset in the file
        expected = f"{path}: file: not UTF-8 text (invalid continuation byte at byte {raw.index(latin1('é'))})"
    assert raw.index(latin1("é")) > 16384
    assert load_error(path) == expected


def test_not_utf8_offset_counts_the_byte_order_mark(tmp_path):
    path = tmp_path / "data.json"
    raw = BOM + b"[" + latin1('{"text": "café"}') + b"]"
    path.write_bytes(raw)
    assert load_error(path) == (
        f"{path}: file: not UTF-8 text (invalid continuation byte at byte {raw.index(latin1('é'))})"
    )
