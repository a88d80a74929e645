"""Property-based fuzzing of record parsing (hypothesis): every malformed record, of each kind below, is a DataError
whose message starts with the record's name (file, position, line, and its id when it has one), never another
exception; random garbage put anywhere in a good record is either read or such a DataError.

Each kind breaks one thing in an otherwise good record, so it must be refused. Run time is a few seconds: the
number of examples is capped and no example database is written (the tests stay hermetic)."""

import json
import os
import tempfile
from datetime import timedelta

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from llmft.data.conversation import Conversation
from llmft.data.records import ROLE_ALIASES, load_conversations, parse_record
from llmft.errors import DataError

WHERE = "fuzz.jsonl: record #7 (line 9)"
FUZZ = settings(
    max_examples=250, deadline=timedelta(milliseconds=500), database=None, suppress_health_check=[HealthCheck.too_slow]
)

# Text a turn may hold: any Unicode a UTF-8 file can carry (astral planes, combining marks, NUL, right-to-left), at
# least one character that is not whitespace, and no reasoning-block tags.
ODD = "\u0000\u200b\u202e\u0301\ufeff\U0001f600\U0010ffff"
text = st.text(alphabet=st.one_of(st.characters(codec="utf-8"), st.sampled_from(ODD)), min_size=1, max_size=300).filter(
    lambda s: s.strip() and "<think>" not in s and "</think>" not in s
)
huge_text = st.text(alphabet=st.characters(codec="utf-8"), min_size=2000, max_size=8000).filter(str.strip)
surrogate = st.characters(categories=["Cs"])  # a lone surrogate, as JSON's "\ud800" escape gives one
scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20))
garbage = st.recursive(
    scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20,
)
not_a_string = st.one_of(
    st.integers(),
    st.floats(),
    st.booleans(),
    st.lists(scalar, min_size=1, max_size=3),
    st.dictionaries(st.text(max_size=5), scalar, min_size=1, max_size=3),
)
not_text_content = st.one_of(
    st.integers(), st.floats(), st.booleans(), st.dictionaries(st.text(max_size=5), scalar, max_size=3)
)
unknown_role = st.one_of(text, huge_text).filter(lambda r: r.lower() not in ROLE_ALIASES)
blank = st.text(alphabet=" \t\n\r\u00a0\u2003\u3000", max_size=10)


def sharegpt(*turns, **fields):
    return {"conversations": [{"from": role, "value": value} for role, value in turns], **fields}


def openai(*messages, **fields):
    return {"messages": list(messages), **fields}


def user(content):
    return {"role": "user", "content": content}


def assistant(content="ok", **fields):
    return {"role": "assistant", "content": content, **fields}


def call(name="get_weather", arguments="{}"):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def with_call(tool_call, **fields):
    """user -> assistant calling `tool_call` -> its result -> assistant: good whenever the call itself is good."""
    return openai(
        user("q"),
        {"role": "assistant", "content": None, "tool_calls": [tool_call]},
        {"role": "tool", "content": "r"},
        assistant("a"),
        **fields,
    )


def function_call_turns(value, result=True):
    turns = [("human", "q"), ("function_call", value)] + ([("observation", "r")] if result else []) + [("gpt", "a")]
    return sharegpt(*turns)


def inserted(s, char):
    return st.integers(0, len(s)).map(lambda i: s[:i] + char + s[i:])


def _is_json(value: str) -> bool:
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def _is_json_object(value: str) -> bool:
    try:
        return isinstance(json.loads(value), dict)
    except ValueError:
        return False


def _drop_none_arguments(record):
    """A None from the strategy stands for a call with no 'arguments' key at all."""
    function = record["messages"][1]["tool_calls"][0]["function"]
    if function["arguments"] is None:
        del function["arguments"]
    return record


# kind -> a strategy of records that are all malformed in that one way
KINDS = {
    "not-an-object": st.one_of(scalar, st.lists(garbage, max_size=3)),
    "unknown-format": st.dictionaries(
        st.text(max_size=10).filter(lambda k: k not in ("conversations", "messages", "instruction", "text")),
        garbage,
        max_size=4,
    ),
    "turns-not-a-list": st.one_of(scalar, st.dictionaries(st.text(max_size=5), garbage, max_size=3)).map(
        lambda turns: {"conversations": turns}
    ),
    "no-turns": st.sampled_from([{"conversations": []}, {"messages": []}, sharegpt(("system", "s"))]),
    "turn-not-an-object": st.one_of(scalar, st.lists(garbage, max_size=3)).map(
        lambda turn: {"messages": [user("q"), turn, assistant()]}
    ),
    "turn-missing-role-or-content": st.sampled_from(
        [{"content": "a"}, {"role": "user"}, {"from": "gpt"}, {"value": "a"}, {}]
    ).map(lambda turn: {"messages": [turn, assistant()]}),
    "role-not-a-string": not_a_string.map(lambda role: {"messages": [{"role": role, "content": "q"}, assistant()]}),
    "unknown-role": unknown_role.map(lambda role: sharegpt(("human", "q"), (role, "a"))),
    "content-not-text": not_text_content.map(lambda content: openai(user("q"), assistant(content))),
    "content-part-not-text": st.lists(
        st.one_of(
            st.none(),
            st.integers(),
            st.floats(),
            st.booleans(),
            st.lists(scalar, max_size=2),
            st.fixed_dictionaries(
                {"type": st.text(max_size=8).filter(lambda t: t != "text"), "text": st.text(max_size=8)}
            ),
        ),
        min_size=1,
        max_size=3,
    )
    .flatmap(lambda bad: st.lists(text, max_size=2).map(lambda good: good + bad))
    .map(lambda parts: openai(user(parts), assistant())),
    "null-content": st.sampled_from(
        [openai(user(None), assistant()), sharegpt(("human", "q"), ("gpt", None)), sharegpt((None, "q"), ("gpt", "a"))]
    ),
    "empty-turn": blank.flatmap(
        lambda b: st.sampled_from(
            [
                sharegpt(("human", b), ("gpt", "a")),
                sharegpt(("human", "q"), ("gpt", b)),
                openai(user([b, b]), assistant()),
            ]
        )
    ),
    "lone-surrogate": st.tuples(text, surrogate)
    .flatmap(lambda ts: inserted(*ts))
    .flatmap(
        lambda bad: st.sampled_from(
            [
                sharegpt(("human", bad), ("gpt", "a")),
                openai(user("q"), assistant(bad)),
                {"id": bad, "text": "x"},
                {"text": "x", bad: 1},
                with_call(call(arguments={"city": bad})),
                {"instruction": "i", "output": bad},
            ]
        )
    ),
    "out-of-order": st.sampled_from(
        [
            sharegpt(("gpt", "a"), ("human", "q")),
            sharegpt(("human", "q")),
            sharegpt(("human", "q"), ("human", "q"), ("gpt", "a")),
            sharegpt(("human", "q"), ("gpt", "a"), ("system", "s")),
            sharegpt(("human", "q"), ("gpt", "a"), ("gpt", "b")),
        ]
    ),
    "system-not-a-string": not_a_string.map(lambda s: sharegpt(("human", "q"), ("gpt", "a"), system=s)),
    "train-flag-broken": st.one_of(
        st.one_of(st.integers(), st.text(max_size=5), st.floats()).map(lambda t: {"train": t}),
        st.one_of(st.floats(allow_nan=True), st.integers(), st.booleans(), st.text(max_size=3))
        .filter(lambda w: isinstance(w, bool) or w not in (0, 1))
        .map(lambda w: {"loss_weight": w}),
        st.just({"train": True, "loss_weight": 0}),
        st.just({"train": False}),
    ).map(lambda flags: openai(user("q"), assistant("a", **flags))),
    "tool-calls-not-a-list": st.one_of(
        st.integers(),
        st.text(min_size=1, max_size=5),
        st.booleans(),
        st.dictionaries(st.text(max_size=4), scalar, min_size=1, max_size=2),
    ).map(lambda calls: openai(user("q"), assistant("a", tool_calls=calls))),
    "tool-call-shape": st.one_of(
        scalar,
        st.lists(scalar, max_size=2),
        st.fixed_dictionaries(
            {
                "type": st.text(max_size=6).filter(lambda t: t != "function"),
                "function": st.just({"name": "f", "arguments": "{}"}),
            }
        ),
        st.fixed_dictionaries({"function": st.one_of(scalar, st.lists(scalar))}),
    ).map(with_call),
    "tool-call-name": st.one_of(st.just(""), not_a_string).map(lambda name: with_call(call(name=name))),
    "tool-call-arguments": st.one_of(
        st.text(max_size=20).filter(lambda a: not _is_json_object(a)),
        st.one_of(st.integers(), st.lists(scalar, max_size=2), st.booleans()),
        st.just(None),
    )
    .map(lambda arguments: with_call(call(arguments=arguments)))
    .map(_drop_none_arguments),
    "tool-call-without-result": st.just(
        openai(user("q"), {"role": "assistant", "tool_calls": [call()]}, assistant("a"))
    ),
    "tool-result-mismatch": st.sampled_from(
        [
            openai(user("q"), {"role": "tool", "content": "r"}, assistant("a")),
            openai(
                user("q"),
                assistant("a", tool_calls=[{**call(), "id": "c1"}]),
                {"role": "tool", "content": "r", "tool_call_id": "c2"},
                assistant("b"),
            ),
            openai(
                user("q"),
                assistant("a", tool_calls=[call()]),
                {"role": "tool", "content": "r", "name": "other"},
                assistant("b"),
            ),
            openai(
                user("q"),
                assistant("a", tool_calls=[call()]),
                {"role": "tool", "content": "r"},
                {"role": "tool", "content": "r"},
                assistant("b"),
            ),
            openai(
                user("q"),
                assistant("a", tool_calls=[call()]),
                {"role": "tool", "content": "r", "name": 3},
                assistant("b"),
            ),
            openai(
                user(
                    "q",
                ),
                assistant("a", tool_calls=[{**call(), "id": 5}]),
                {"role": "tool", "content": "r"},
                assistant("b"),
            ),
        ]
    ),
    "tools-field-broken": st.one_of(
        st.one_of(st.integers(min_value=1), st.dictionaries(st.text(max_size=4), scalar, min_size=1, max_size=2)),
        st.text(max_size=10).map(lambda t: "[{name: " + t),
        st.lists(
            st.one_of(scalar, st.just({"type": "function"}), st.just({"function": {"name": ""}})),
            min_size=1,
            max_size=3,
        ),
        st.just([{"name": "get_time"}]),
    ).map(lambda tools: with_call(call(), tools=tools)),
    "function-call-value": st.one_of(
        st.text(max_size=20).filter(lambda v: not _is_json(v)),
        st.sampled_from(
            [
                "[]",
                "3",
                '"f"',
                "[1]",
                '{"arguments": {}}',
                '{"name": "f"}',
                '{"name": "f", "arguments": "[1]"}',
                '[{"name": "f", "arguments": {}}, 2]',
            ]
        ),
    ).map(function_call_turns),
    "function-call-turn-broken": st.sampled_from(
        [
            function_call_turns('{"name": "f", "arguments": {}}', result=False),
            sharegpt(("human", "q"), ("observation", "r"), ("gpt", "a")),
            {
                "conversations": [
                    {"from": "human", "value": "q"},
                    {"from": "function_call", "value": '{"name": "f", "arguments": {}}', "tool_calls": [call()]},
                    {"from": "observation", "value": "r"},
                    {"from": "gpt", "value": "a"},
                ]
            },
        ]
    ),
    "id-not-a-name": st.one_of(
        st.booleans(),
        st.lists(scalar, max_size=2),
        st.dictionaries(st.text(max_size=3), scalar, max_size=2),
        st.just(10**4400),
    ).map(lambda i: {"id": i, "text": "x"}),
    "alpaca-broken": st.one_of(
        not_a_string.map(lambda v: {"instruction": v, "output": "o"}),
        not_a_string.map(lambda v: {"instruction": "i", "output": v}),
        not_a_string.map(lambda v: {"instruction": "i", "input": v, "output": "o"}),
        blank.map(lambda b: {"instruction": "i", "output": b}),
        blank.map(lambda b: {"instruction": b, "output": "o"}),
    ),
    "plain-text-broken": st.one_of(not_a_string, st.none(), blank).map(lambda t: {"text": t}),
    "reasoning-broken": st.one_of(
        st.sampled_from(
            [
                "<think>r",
                "a</think>b<think>",
                "<think>a</think><think>b</think>c",
                "x <think>r</think>y",
                "</think>a<think>b",
            ]
        ).map(lambda c: openai(user("q"), assistant(c))),
        not_a_string.map(lambda r: openai(user("q"), assistant("a", reasoning_content=r))),
        st.just(openai(user("q"), {"role": "assistant", "reasoning_content": "r", "content": "<think>r</think>a"})),
        st.just(openai({"role": "user", "content": "q", "reasoning_content": "r"}, assistant())),
    ),
    "nested-garbage": st.recursive(
        st.lists(scalar, max_size=2), lambda inner: st.lists(inner, min_size=1, max_size=2), max_leaves=30
    ).map(lambda deep: sharegpt(("human", [deep]), ("gpt", "a"))),
    "huge-unknown-role-with-odd-text": st.tuples(huge_text, text).map(
        lambda rt: {"messages": [{"role": rt[0] + "\u202e", "content": rt[1]}, assistant()]}
    ),
}


def assert_named_data_error(record, where=WHERE):
    try:
        conversation = parse_record(record, where, default_id="7")
    except DataError as e:
        assert str(e).startswith(where), str(e)
        if isinstance(record, dict) and isinstance(record.get("id"), str):
            assert f"(id {record['id']!r})" in str(e)
        return str(e)
    raise AssertionError(f"accepted a malformed record as {conversation}")


kinds = st.sampled_from(sorted(KINDS)).flatmap(lambda kind: st.tuples(st.just(kind), KINDS[kind]))


@FUZZ
@given(kinds, st.one_of(st.none(), st.text(min_size=1, max_size=10).filter(str.strip)))
def test_every_malformed_record_is_a_data_error_naming_it(kind_and_record, record_id):
    kind, record = kind_and_record
    if record_id is not None and isinstance(record, dict) and "id" not in record:
        record = {"id": record_id, **record}
    assert_named_data_error(record)


@settings(FUZZ, max_examples=150)
@given(kinds)
def test_malformed_records_in_a_jsonl_file_name_file_record_and_line(kind_and_record):
    _, record = kind_and_record
    try:
        line = json.dumps(record)  # ensure_ascii: lone surrogates are written as \ud800 escapes, as in a user's file
    except ValueError:
        assume(False)  # an integer too long for Python to print cannot be written either
    good = {"id": "good", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "fuzz.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(good) + "\n" + line + "\n")
        try:
            load_conversations(path)
        except DataError as e:
            assert str(e).startswith(f"{path}: record #1 (line 2)"), str(e)
        else:
            raise AssertionError(f"accepted a malformed record: {record!r}")


def good_records():
    return st.tuples(text, text, text).flatmap(
        lambda t: st.sampled_from(
            [
                sharegpt(("human", t[0]), ("gpt", t[1]), system=t[2]),
                openai(user(t[0]), assistant(t[1]), tools=[{"type": "function", "function": {"name": "get_weather"}}]),
                with_call(call(arguments=json.dumps({"city": t[0]}))),
                function_call_turns(json.dumps({"name": "f", "arguments": {"x": t[1]}})),
                {"instruction": t[0], "input": t[1], "output": t[2]},
                {"text": t[0]},
            ]
        )
    )


@st.composite
def mutated(draw):
    """A good record with one value somewhere in it (or one key of a dict in it) replaced by random garbage."""
    record = json.loads(json.dumps(draw(good_records())))
    containers, stack = [], [record]
    while stack:
        node = stack.pop()
        if isinstance(node, dict) and node:
            containers.append(node)
            stack.extend(node.values())
        elif isinstance(node, list) and node:
            containers.append(node)
            stack.extend(node)
    target = draw(st.sampled_from(containers))
    replacement = draw(st.one_of(garbage, surrogate, huge_text))
    if isinstance(target, dict):
        key = draw(st.sampled_from(sorted(target)))
        if draw(st.booleans()):
            target[key] = replacement
        else:
            target[draw(st.text(max_size=12))] = target.pop(key)
    else:
        target[draw(st.integers(0, len(target) - 1))] = replacement
    return record


@FUZZ
@given(mutated())
def test_garbage_anywhere_in_a_good_record_is_read_or_a_named_data_error(record):
    try:
        conversation = parse_record(record, WHERE, default_id="7")
    except DataError as e:
        assert str(e).startswith(WHERE), str(e)
        return
    assert isinstance(conversation, Conversation)
    assert parse_record(conversation.to_record()) == conversation  # what is read is read back the same


@settings(FUZZ, max_examples=100)
@given(good_records())
def test_good_records_with_odd_unicode_are_read(record):
    assert isinstance(parse_record(record, WHERE), Conversation)
