"""Reading conversation files into one internal type, `Conversation`.

Accepted files: a JSON list of records, or JSONL (one record a line). Accepted records:

- Qwen / ShareGPT: `{"id", "conversations": [{"from": "user"|"assistant"|"system", "value": ...}]}`, with the
  ShareGPT aliases `human`/`gpt`, and an optional record-level `"system"`.
- OpenAI: `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}]}`.
- Alpaca: `{"instruction", "input"?, "output", "system"?}`.
- Plain text for continued pre-training: `{"text": ...}` (every token carries loss).

Every problem is reported as a `DataError` that names the file and the record (its `id` when it has one, its
position and line otherwise), so a bad record in a million is found in seconds.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterator

from llmft.errors import DataError

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"

ROLE_ALIASES = {
    "system": SYSTEM,
    "user": USER,
    "human": USER,
    "assistant": ASSISTANT,
    "gpt": ASSISTANT,
    "chatgpt": ASSISTANT,
    "bot": ASSISTANT,
    "model": ASSISTANT,
}


@dataclass(frozen=True)
class Message:
    role: str  # one of SYSTEM, USER, ASSISTANT
    content: str


@dataclass(frozen=True)
class Conversation:
    """One training sample.

    A chat sample has `messages`: an optional system message, then user and assistant messages alternating, starting
    with the user and holding at least one assistant message. A plain-text sample has `text` and no messages.
    """

    id: str
    messages: tuple[Message, ...] = ()
    text: str | None = None

    @property
    def is_plain_text(self) -> bool:
        return self.text is not None

    def as_dicts(self, default_system: str | None = None) -> list[dict]:
        """Messages as `apply_chat_template` takes them; `default_system` fills in a missing system message."""
        dicts = [{"role": m.role, "content": m.content} for m in self.messages]
        if default_system and (not dicts or dicts[0]["role"] != SYSTEM):
            dicts.insert(0, {"role": SYSTEM, "content": default_system})
        return dicts

    def to_record(self) -> dict:
        """The canonical OpenAI-style record; `parse_record` reads it back to an equal Conversation."""
        if self.is_plain_text:
            return {"id": self.id, "text": self.text}
        return {"id": self.id, "messages": [{"role": m.role, "content": m.content} for m in self.messages]}


def load_conversations(path: str) -> list[Conversation]:
    """Every conversation in a file, validated. Raises DataError naming the first bad record."""
    return list(iter_conversations(path))


def iter_conversations(path: str) -> Iterator[Conversation]:
    """Conversations one at a time, so a large file never sits in memory whole (JSONL is read line by line)."""
    for index, where, record in iter_records(path):
        yield parse_record(record, where, default_id=str(index))


def iter_records(path: str) -> Iterator[tuple[int, str, object]]:
    """(index, where, raw record) triples; `where` names the file, the record's position and line for error messages."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(BOM).lstrip()
        f.seek(0)
        if not head:
            raise DataError(f"{path}: the file is empty")
        if head.startswith(b"["):
            yield from _iter_json_list(f, path)
        else:
            yield from _iter_jsonl(f, path)


BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark, as some editors write: not part of the first record


def _decode(raw: bytes, path: str, where: str) -> str:
    """UTF-8 text of `raw` without a leading byte-order mark; byte offsets in errors count the mark."""
    skipped = len(BOM) if raw.startswith(BOM) else 0
    try:
        return raw[skipped:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: {where}: not UTF-8 text ({e.reason} at byte {e.start + skipped})") from None


def _iter_jsonl(f, path: str) -> Iterator[tuple[int, str, object]]:
    index = 0
    for line_no, raw in enumerate(f, start=1):
        line = _decode(raw, path, f"line {line_no}")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {line_no} (record #{index}): malformed JSON: {e.msg} at column {e.colno}") from None
        yield index, f"{path}: record #{index} (line {line_no})", record
        index += 1


def _iter_json_list(f, path: str) -> Iterator[tuple[int, str, object]]:
    # The whole list is parsed at once: a JSON list cannot be split without parsing it. Use JSONL for files too
    # large for memory.
    text = _decode(f.read(), path, "file")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records")
    for index, record in enumerate(records):
        yield index, f"{path}: record #{index}", record


def parse_record(record: object, where: str = "record", default_id: str = "0") -> Conversation:
    """One raw record, in any accepted format, as a validated Conversation (id: its own, else `default_id`)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    record_id = default_id
    if record.get("id") is not None:
        record_id = str(record["id"])
        where = f"{where} (id {record_id!r})"

    if "conversations" in record or "messages" in record:
        key = "conversations" if "conversations" in record else "messages"
        messages = _parse_turns(record[key], key, where)
        system = record.get("system")
        if system is not None:
            if not isinstance(system, str):
                raise DataError(f"{where}: 'system' must be a string")
            if messages and messages[0].role == SYSTEM:
                raise DataError(f"{where}: has both a 'system' field and a system turn")
            if system:
                messages = (Message(SYSTEM, system),) + messages
        _check_order(messages, where)
        return Conversation(id=record_id, messages=messages)
    if "instruction" in record and "output" in record:
        return Conversation(id=record_id, messages=_parse_alpaca(record, where))
    if "text" in record:
        text = record["text"]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: 'text' must be a non-empty string")
        return Conversation(id=record_id, text=text)
    raise DataError(
        f"{where}: unknown record format (keys {sorted(record)}); expected 'conversations', 'messages', "
        "'instruction'+'output' or 'text'"
    )


def _parse_turns(turns: object, key: str, where: str) -> tuple[Message, ...]:
    if not isinstance(turns, list):
        raise DataError(f"{where}: '{key}' must be a list of turns")
    if not turns:
        raise DataError(f"{where}: empty conversation")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: turn {i} must be an object")
        role = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        if role is None or content is None:
            raise DataError(f"{where}: turn {i} needs 'from' and 'value' (or 'role' and 'content'); has {sorted(turn)}")
        if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
            raise DataError(f"{where}: turn {i}: unknown role {role!r}; known roles: {sorted(ROLE_ALIASES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: turn {i}: content must be a string, got {type(content).__name__}")
        messages.append(Message(ROLE_ALIASES[role.lower()], content))
    return tuple(messages)


def _parse_alpaca(record: dict, where: str) -> tuple[Message, ...]:
    fields = {k: record.get(k) for k in ("instruction", "input", "output", "system")}
    for key, value in fields.items():
        if value is not None and not isinstance(value, str):
            raise DataError(f"{where}: '{key}' must be a string")
    prompt = "\n\n".join(part for part in (fields["instruction"], fields["input"]) if part)
    if not prompt.strip() or not (fields["output"] or "").strip():
        raise DataError(f"{where}: Alpaca record needs a non-empty 'instruction' and 'output'")
    messages = [Message(USER, prompt), Message(ASSISTANT, fields["output"])]
    if fields["system"]:
        messages.insert(0, Message(SYSTEM, fields["system"]))
    return tuple(messages)


def _check_order(messages: tuple[Message, ...], where: str) -> None:
    turns = messages[1:] if messages and messages[0].role == SYSTEM else messages
    if not turns:
        raise DataError(f"{where}: empty conversation (no user or assistant turn)")
    for i, message in enumerate(turns):
        expected = USER if i % 2 == 0 else ASSISTANT
        if message.role != expected:
            position = i + (len(messages) - len(turns))
            if message.role == SYSTEM:
                raise DataError(f"{where}: turn {position}: a system turn may only come first")
            raise DataError(f"{where}: turn {position}: expected a {expected} turn, got {message.role} (turns must alternate, starting with the user)")
    if not any(m.role == ASSISTANT for m in turns):
        raise DataError(f"{where}: no assistant turn, so nothing to train on")
