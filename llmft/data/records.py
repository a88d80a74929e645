"""Parsing records of the supported formats into one internal type, `Conversation` (`llmft.data.conversation`).

Files are read by `llmft.data.reading` (a JSON list or JSONL); formats may be mixed in one file. Records:

- Qwen / ShareGPT: `{"id", "conversations": [{"from": "user"|"assistant"|"system", "value": ...}]}`, with the
  ShareGPT aliases `human`/`gpt`, and an optional record-level `"system"`. LLaMA-Factory's tool turns are read too:
  `function_call` (the value is a JSON call `{"name", "arguments"}` or a list of them) and `observation` (a tool
  result), with the tool schemas in a record-level `"tools"` (a list, or a JSON string of one).
- OpenAI: `{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}], "tools"?: [...]}`; an
  assistant message may carry `tool_calls` (`{"type": "function", "function": {"name", "arguments"}}`, arguments an
  object or a JSON string of one, several per message) and `reasoning_content`; `content` may be a list of text
  parts (`{"type": "text", "text": ...}`, or `"value"` for `"text"`), which are joined with newlines as vLLM does;
  an assistant's may also hold LLaMA-Factory v1's parts of type `"reasoning"` and `"tool_call"` (a call
  `{"name", "arguments"}`, or a JSON string of one), read as its reasoning and tool calls.
- Alpaca: `{"instruction", "input"?, "output", "system"?}`.
- Plain text for continued pre-training: `{"text": ...}` (every token carries loss).

Reasoning given as a `<think>...</think>` block at the start of an assistant's content is read as its
`reasoning_content`, so every template sees it the one way it understands. A message may say whether it is trained:
`"train": true|false` or `"loss_weight": 1|0` (other weights are refused: weighted loss is not implemented); without
either, `--train_turns` decides (see `llmft.data.render`).

Tool data is checked: a call's arguments must be a JSON object, a tool result must answer a call of the assistant
turn before it (and its `tool_call_id` / `name`, when given, must match one), and when the record lists `tools`, a
call to a function not among them is an error (it would teach the model to call tools it was never shown).

Content is checked too: a user or assistant turn that is empty or whitespace only (invisible characters such as
zero-width spaces count as whitespace, `is_blank`) is an error, as an Alpaca record with an empty output is (an empty
answer would train the model to reply with nothing: only its end-of-turn token carries loss). An assistant turn may
have empty content when it calls tools or holds reasoning; system and tool turns may be empty. Text must be valid
Unicode: a lone surrogate escape such as `"\\ud800"`, which JSON allows but UTF-8
cannot encode, is an error naming the field that holds it.

Every problem is reported as a `DataError` that names the file and the record (its `id` when it has one, its
position and line otherwise).
"""

from __future__ import annotations

import json
import unicodedata
from typing import Iterator

from llmft.data.conversation import ASSISTANT, SYSTEM, TOOL, USER, Conversation, Message, ToolCall, tool_names
from llmft.data.reading import iter_records, json_problem
from llmft.errors import DataError

FUNCTION_CALL = "function_call"  # LLaMA-Factory's ShareGPT role for an assistant turn that calls tools

ROLE_ALIASES = {
    "system": SYSTEM,
    "user": USER,
    "human": USER,
    "assistant": ASSISTANT,
    "gpt": ASSISTANT,
    "chatgpt": ASSISTANT,
    "bot": ASSISTANT,
    "model": ASSISTANT,
    "tool": TOOL,
    "observation": TOOL,  # LLaMA-Factory
    "function": TOOL,  # OpenAI's legacy role for a function's result
    FUNCTION_CALL: FUNCTION_CALL,
}

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def load_conversations(path: str) -> list[Conversation]:
    """Every conversation in a file, validated. Raises DataError naming the first bad record."""
    return list(iter_conversations(path))


def iter_conversations(path: str) -> Iterator[Conversation]:
    """Conversations one at a time, so a large file never sits in memory whole (JSONL is read line by line)."""
    for index, where, record in iter_records(path):
        yield parse_record(record, where, default_id=str(index))


def parse_record(record: object, where: str = "record", default_id: str = "0") -> Conversation:
    """One raw record, in any accepted format, as a validated Conversation (id: its own, else `default_id`)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    record_id = default_id
    if record.get("id") is not None:
        record_id = _record_id(record["id"], where)
        where = f"{where} (id {record_id!r})"
    _check_unicode(record, where)

    if "conversations" in record or "messages" in record:
        key = "conversations" if "conversations" in record else "messages"
        tools = parse_tools(record.get("tools"), where)
        messages = _parse_turns(record[key], key, where)
        system = record.get("system")
        if system is not None:
            if not isinstance(system, str):
                raise DataError(f"{where}: 'system' must be a string")
            if messages and messages[0].role == SYSTEM:
                raise DataError(f"{where}: has both a 'system' field and a system turn")
            if system:
                messages = (Message(SYSTEM, system),) + messages
        _check_order(messages, tools, where)
        return Conversation(id=record_id, messages=messages, tools=tools)
    if "instruction" in record and "output" in record:
        return Conversation(id=record_id, messages=_parse_alpaca(record, where))
    if "text" in record:
        text = record["text"]
        if not isinstance(text, str) or is_blank(text):
            raise DataError(f"{where}: 'text' must be a non-empty string")
        return Conversation(id=record_id, text=text)
    raise DataError(
        f"{where}: unknown record format (keys {sorted(record)}); expected 'conversations', 'messages', "
        "'instruction'+'output' or 'text'"
    )


def _record_id(value: object, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: 'id' must be a string or a number, got {type(value).__name__}")
    try:
        return str(value)
    except ValueError:  # an integer longer than Python prints (4300 digits)
        raise DataError(f"{where}: 'id' is a number too long to print") from None


def _check_unicode(record: dict, where: str) -> None:
    """Every string of the record, keys included, must be encodable as UTF-8: JSON's `\\ud800` escape gives a lone
    surrogate, which the tokenizer, the Arrow cache and the lazy spool cannot take. The walk is iterative, so nesting
    of any depth is checked without recursion."""
    stack = [(record, "")]
    while stack:
        value, at = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise DataError(
                        f"{where}: {at or 'a key'} holds a lone surrogate {value[e.start]!r} (half of a "
                        "UTF-16 pair, e.g. from the JSON escape \\ud800 alone), which is not valid "
                        "Unicode text"
                    ) from None
        elif isinstance(value, dict):
            for key, item in value.items():
                stack.append((key, f"a key of {at or 'the record'}"))
                stack.append((item, f"{at}.{key}" if at else str(key)))
        elif isinstance(value, list):
            stack.extend((item, f"{at}[{i}]") for i, item in enumerate(value))


def parse_tools(tools: object, where: str) -> tuple[dict, ...]:
    """Function schemas (a record's `"tools"`, or a chat's tools file: a list, or a JSON string of one) in OpenAI's
    shape; LLaMA-Factory's bare `{"name", ...}` functions are wrapped. `where` names the record or file in errors."""
    if tools is None or tools == "":
        return ()
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: 'tools' is a string but not valid JSON ({json_problem(e)})") from None
    if not isinstance(tools, list):
        raise DataError(f"{where}: 'tools' must be a list of function schemas, got {type(tools).__name__}")
    schemas = []
    for i, tool in enumerate(tools):
        if isinstance(tool, dict) and "function" not in tool and "name" in tool:
            tool = {"type": "function", "function": tool}
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise DataError(
                f"{where}: tool {i} must be a function schema with a name "
                '({"type": "function", "function": {"name": ..., "parameters": ...}})'
            )
        schemas.append(tool)
    return tuple(schemas)


def _parse_turns(turns: object, key: str, where: str) -> tuple[Message, ...]:
    if not isinstance(turns, list):
        raise DataError(f"{where}: '{key}' must be a list of turns")
    if not turns:
        raise DataError(f"{where}: empty conversation")
    return tuple(_parse_turn(turn, i, f"{where}: turn {i}") for i, turn in enumerate(turns))


def _parse_turn(turn: object, i: int, where: str) -> Message:
    if not isinstance(turn, dict):
        raise DataError(f"{where} must be an object")
    role = turn.get("from", turn.get("role"))
    content = turn.get("value", turn.get("content"))
    tool_calls = turn.get("tool_calls")
    if content is None and tool_calls:
        content = ""  # OpenAI: an assistant message that only calls tools has null content
    if role is None or content is None:
        nulls = [key for key in ("from", "value", "role", "content") if key in turn and turn[key] is None]
        if nulls:
            raise DataError(
                f"{where}: {' and '.join(map(repr, nulls))} {'is' if len(nulls) == 1 else 'are'} null; "
                "a turn needs a role and its text as a string"
            )
        raise DataError(f"{where} needs 'from' and 'value' (or 'role' and 'content'); has {sorted(turn, key=str)}")
    if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
        raise DataError(f"{where}: unknown role {role!r}; known roles: {sorted(ROLE_ALIASES)}")
    role = ROLE_ALIASES[role.lower()]
    content, part_reasoning, part_calls = _content_parts(content, where)
    train = _train_flag(turn, where)
    if role not in (ASSISTANT, FUNCTION_CALL) and (part_reasoning is not None or part_calls):
        kind = "reasoning" if part_reasoning is not None else "tool_call"
        raise DataError(f"{where}: only assistant turns may have content parts of type {kind!r}")

    if role == FUNCTION_CALL:
        if part_reasoning is not None or part_calls:
            raise DataError(f"{where}: a function_call turn holds its calls in its value, not in content parts")
        if tool_calls:
            raise DataError(f"{where}: a function_call turn holds its calls in its value, not in 'tool_calls'")
        calls = _parse_function_call_value(content, where)
        return Message(ASSISTANT, "", tool_calls=calls, train=train)
    if role != ASSISTANT:
        for name in ("tool_calls", "reasoning_content"):
            if turn.get(name):
                raise DataError(f"{where}: only assistant turns may have '{name}'")
        if train:
            raise DataError(f"{where}: only assistant turns can be trained, not a {role} turn")
    if role == TOOL:
        name, call_id = turn.get("name"), turn.get("tool_call_id")
        for label, value in (("name", name), ("tool_call_id", call_id)):
            if value is not None and not isinstance(value, str):
                raise DataError(f"{where}: '{label}' must be a string")
        return Message(TOOL, content, name=name, tool_call_id=call_id)
    if role != ASSISTANT:
        return Message(role, content)

    calls = part_calls
    if tool_calls is not None:
        if not isinstance(tool_calls, list):
            raise DataError(f"{where}: 'tool_calls' must be a list")
        if part_calls:
            raise DataError(f"{where}: has both 'tool_calls' and content parts of type 'tool_call'")
        calls = tuple(_parse_tool_call(call, j, where) for j, call in enumerate(tool_calls))
    reasoning = turn.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        raise DataError(f"{where}: 'reasoning_content' must be a string")
    if part_reasoning is not None:
        if reasoning is not None:
            raise DataError(f"{where}: has both 'reasoning_content' and content parts of type 'reasoning'")
        reasoning = part_reasoning
    content, inline = _split_think(content, where)
    if inline is not None:
        if reasoning is not None:
            raise DataError(f"{where}: has both 'reasoning_content' and a {THINK_OPEN} block in its content")
        reasoning = inline
    return Message(ASSISTANT, content, tool_calls=calls, reasoning=reasoning, train=train)


def _content_parts(content: object, where: str) -> tuple[str, str | None, tuple[ToolCall, ...]]:
    """(text, reasoning or None, tool calls) of a message's content: a string is all text; a list holds text parts
    (joined with newlines, as vLLM joins them) and, as in LLaMA-Factory's v1 format, parts of type "reasoning" (joined
    likewise) and "tool_call" (a call {"name", "arguments"}, as a JSON string or an object), each with its "text" or
    "value"."""
    if isinstance(content, str):
        return content, None, ()
    if not isinstance(content, list):
        raise DataError(f"{where}: content must be a string or a list of text parts, got {type(content).__name__}")
    texts, reasoning, calls = [], [], []
    for j, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
            continue
        kind = part.get("type", "text") if isinstance(part, dict) else None
        value = part.get("text", part.get("value")) if isinstance(part, dict) else None
        if kind == "tool_call" and isinstance(value, dict):
            calls.append(_tool_call(value, f"{where}: content part {j}"))
            continue
        if kind == "tool_call" and isinstance(value, str):
            calls += _parse_function_call_value(value, f"{where}: content part {j}")
            continue
        if kind not in CONTENT_PART_TYPES or not isinstance(value, str):
            what = f"type {kind!r}" if kind is not None else type(part).__name__
            raise DataError(
                f"{where}: content part {j} ({what}) is not a text part: only text, reasoning and tool_call parts "
                '({"type": "text", "text": ...}) are supported'
            )
        (reasoning if kind == "reasoning" else texts).append(value)
    return "\n".join(texts), "\n".join(reasoning) if reasoning else None, tuple(calls)


CONTENT_PART_TYPES = ("text", "reasoning")  # besides "tool_call", whose value is a call


def _train_flag(turn: dict, where: str) -> bool | None:
    """The message's own training switch: `train` (true/false) or `loss_weight` (1/0); None when it has neither."""
    train = turn.get("train")
    if train is not None and not isinstance(train, bool):
        raise DataError(f"{where}: 'train' must be true or false, got {train!r}")
    weight = turn.get("loss_weight")
    if weight is not None:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1):
            raise DataError(
                f"{where}: loss_weight {weight!r} is not supported: use 1 (trained) or 0 (not trained); "
                "weighted loss is not implemented"
            )
        if train is not None and train != bool(weight):
            raise DataError(f"{where}: 'train' {str(train).lower()} contradicts loss_weight {weight}")
        train = bool(weight)
    return train


def _parse_tool_call(call: object, j: int, where: str) -> ToolCall:
    if not isinstance(call, dict):
        raise DataError(f"{where}: tool call {j} must be an object")
    function = call.get("function", call)  # OpenAI nests it under "function"; some datasets do not
    if call.get("type", "function") != "function" or not isinstance(function, dict):
        raise DataError(
            f'{where}: tool call {j} must be {{"type": "function", "function": {{"name", "arguments"}}}}}}}}'
        )
    call_id = call.get("id")
    if call_id is not None and not isinstance(call_id, str):
        raise DataError(f"{where}: tool call {j}: 'id' must be a string")
    return _tool_call(function, f"{where}: tool call {j}", call_id)


def _tool_call(function: dict, where: str, call_id: str | None = None) -> ToolCall:
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise DataError(f"{where} needs a function 'name'")
    if "arguments" not in function:
        raise DataError(f"{where} ({name!r}) has no 'arguments' (give {{}} for a call without any)")
    arguments = function["arguments"]
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where} ({name!r}): arguments are not valid JSON ({json_problem(e)}): {_clip(function['arguments'])}"
            ) from None
    if not isinstance(arguments, dict):
        raise DataError(f"{where} ({name!r}): arguments must be a JSON object, got {type(arguments).__name__}")
    return ToolCall(name, arguments, call_id)


def _parse_function_call_value(value: str, where: str) -> tuple[ToolCall, ...]:
    """LLaMA-Factory's function_call turn: its value is a JSON call, or a JSON list of calls for parallel ones."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise DataError(
            f'{where}: a function_call value must be JSON {{"name", "arguments"}} (or a list of '
            f"them); not valid JSON ({json_problem(e)}): {_clip(value)}"
        ) from None
    calls = parsed if isinstance(parsed, list) else [parsed]
    if not calls or not all(isinstance(c, dict) for c in calls):
        raise DataError(
            f'{where}: a function_call value must be a JSON object {{"name", "arguments"}} or a non-empty list of them'
        )
    return tuple(_tool_call(c, f"{where}: call {j}" if len(calls) > 1 else where) for j, c in enumerate(calls))


def _split_think(content: str, where: str) -> tuple[str, str | None]:
    """(content, reasoning) of an assistant's content that may open with a <think>...</think> block, split as Qwen3's
    template splits it; reasoning is None when there is no block."""
    if THINK_CLOSE not in content:
        if THINK_OPEN in content:
            raise DataError(f"{where}: {THINK_OPEN} without {THINK_CLOSE}")
        return content, None
    if content.count(THINK_CLOSE) > 1 or content.count(THINK_OPEN) > 1:
        raise DataError(f"{where}: more than one {THINK_OPEN}...{THINK_CLOSE} block")
    before, after = content.split(THINK_CLOSE)
    if THINK_OPEN in before:
        lead, before = before.split(THINK_OPEN)
        if lead.strip():
            raise DataError(f"{where}: text before {THINK_OPEN}: the reasoning block must open the answer")
    elif THINK_OPEN in after:
        raise DataError(f"{where}: {THINK_CLOSE} before {THINK_OPEN}")
    return after.lstrip("\n"), before.strip("\n")


# Characters that show nothing but are neither whitespace to str.strip() nor format characters (Unicode category Cf,
# the zero-width space and joiners, the word joiner, the byte-order mark): the Hangul fillers and the blank Braille
# pattern, which render as empty space.
INVISIBLE_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def is_blank(text: str) -> bool:
    """Whether `text` shows nothing: only whitespace and invisible characters (a reply of zero-width spaces would
    train the model to answer with nothing, like an empty one)."""
    return all(c.isspace() or c in INVISIBLE_LETTERS or unicodedata.category(c) == "Cf" for c in text)


def _clip(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _parse_alpaca(record: dict, where: str) -> tuple[Message, ...]:
    fields = {k: record.get(k) for k in ("instruction", "input", "output", "system")}
    for key, value in fields.items():
        if value is not None and not isinstance(value, str):
            raise DataError(f"{where}: '{key}' must be a string")
    prompt = "\n\n".join(part for part in (fields["instruction"], fields["input"]) if part)
    if is_blank(prompt) or is_blank(fields["output"] or ""):
        raise DataError(f"{where}: Alpaca record needs a non-empty 'instruction' and 'output'")
    messages = [Message(USER, prompt), Message(ASSISTANT, fields["output"])]
    if fields["system"]:
        messages.insert(0, Message(SYSTEM, fields["system"]))
    return tuple(messages)


def _check_order(messages: tuple[Message, ...], tools: tuple[dict, ...], where: str) -> None:
    """Turns go user -> assistant -> user ..., except that an assistant turn with tool calls is followed by their
    results (one tool turn per call at most) and then by the assistant again."""
    offset = 1 if messages and messages[0].role == SYSTEM else 0
    turns = messages[offset:]
    if not turns:
        raise DataError(f"{where}: empty conversation (no user or assistant turn)")
    known = tool_names(tools)
    previous = None  # the last user or assistant message
    calls, call_turn, results = (), 0, 0  # the open tool calls, the turn that made them, results seen so far
    for i, message in enumerate(turns):
        position = i + offset
        if message.role == SYSTEM:
            raise DataError(f"{where}: turn {position}: a system turn may only come first")
        if message.role == TOOL:
            if not calls:
                raise DataError(
                    f"{where}: turn {position}: a tool result with no tool call before it (the tool "
                    "results must follow the assistant turn that calls the tools)"
                )
            results += 1
            if results > len(calls):
                raise DataError(
                    f"{where}: turn {position}: {results} tool results answer turn {call_turn}'s "
                    f"{len(calls)} tool call{'s' if len(calls) > 1 else ''}"
                )
            _check_result_matches(message, calls, call_turn, f"{where}: turn {position}")
            continue
        if calls and results == 0:
            raise DataError(
                f"{where}: turn {position}: the tool calls of turn {call_turn} have no result (expected "
                f"a tool turn, got {message.role})"
            )
        expected = ASSISTANT if calls or (previous is not None and previous.role == USER) else USER
        if message.role != expected:
            raise DataError(
                f"{where}: turn {position}: expected a {expected} turn, got {message.role} (turns must "
                "alternate, starting with the user)"
            )
        if message.role == USER and is_blank(message.content):
            raise DataError(f"{where}: turn {position}: the user turn is empty (or whitespace only)")
        if message.role == ASSISTANT and not (
            not is_blank(message.content) or message.tool_calls or not is_blank(message.reasoning or "")
        ):
            raise DataError(
                f"{where}: turn {position}: the assistant turn is empty (or whitespace only): it would "
                "train the model to reply with nothing"
            )
        calls, results = (), 0
        if message.tool_calls:
            calls, call_turn = message.tool_calls, position
            unknown = [c.name for c in message.tool_calls if known and c.name not in known]
            if unknown:
                raise DataError(
                    f"{where}: turn {position} calls {', '.join(map(repr, unknown))}, which the record's "
                    f"tools do not define (they define {', '.join(map(repr, known))})"
                )
        previous = message
    if not any(m.role == ASSISTANT for m in turns):
        raise DataError(f"{where}: no assistant turn, so nothing to train on")
    if all(m.train is False for m in turns if m.role == ASSISTANT):
        raise DataError(f"{where}: every assistant turn says train false (or loss_weight 0), so nothing to train on")


def _check_result_matches(result: Message, calls: tuple[ToolCall, ...], call_turn: int, where: str) -> None:
    if result.tool_call_id is not None and any(c.id is not None for c in calls):
        if result.tool_call_id not in [c.id for c in calls]:
            raise DataError(
                f"{where}: tool_call_id {result.tool_call_id!r} matches no call of turn {call_turn} "
                f"(its ids: {', '.join(repr(c.id) for c in calls)})"
            )
    if result.name is not None and result.name not in [c.name for c in calls]:
        raise DataError(
            f"{where}: a result of {result.name!r}, which turn {call_turn} does not call (it calls "
            f"{', '.join(repr(c.name) for c in calls)})"
        )
