"""Reading conversation files: every accepted record format becomes the right Conversation, read the same from a JSON
list and from JSONL, and every bad file or record is a DataError whose message names the file and the record (its
position, its line in JSONL, its id when it has one)."""

import json

import pytest

from llmft.data.formats import ASSISTANT, SYSTEM, USER, Conversation, Message, load_conversations, parse_record
from llmft.errors import DataError
from tests.conftest import chat_record, write_records

S, U, A = SYSTEM, USER, ASSISTANT

# Every test file starts with this record, so the record under test is #1 and its default id is "1", not "0".
FILLER = chat_record("Hi", "Hello!", id="filler")
FILLER_CONVERSATION = Conversation("filler", (Message(U, "Hi"), Message(A, "Hello!")))


def conversation(id, *messages, text=None):
    return Conversation(id, tuple(Message(role, content) for role, content in messages), text)


FORMATS = {
    "qwen-with-system-turn": (
        {"id": "q-1", "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "user", "value": "What is 2 + 3?"},
            {"from": "assistant", "value": "5."},
            {"from": "user", "value": "And 7 times 6?"},
            {"from": "assistant", "value": "42."},
        ]},
        conversation("q-1", (S, "Be brief."), (U, "What is 2 + 3?"), (A, "5."), (U, "And 7 times 6?"), (A, "42.")),
    ),
    "qwen-record-level-system": (
        {"id": "q-2", "system": "You are Pico.", "conversations": [
            {"from": "user", "value": "Who are you?"}, {"from": "assistant", "value": "Pico."}]},
        conversation("q-2", (S, "You are Pico."), (U, "Who are you?"), (A, "Pico.")),
    ),
    "qwen-empty-record-level-system-adds-nothing": (
        {"system": "", "conversations": [{"from": "user", "value": "a"}, {"from": "assistant", "value": "b"}]},
        conversation("1", (U, "a"), (A, "b")),
    ),
    "sharegpt-human-gpt": (
        {"conversations": [
            {"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi there."},
            {"from": "Human", "value": "Bye"}, {"from": "GPT", "value": "Goodbye."},
        ]},
        conversation("1", (U, "Hello"), (A, "Hi there."), (U, "Bye"), (A, "Goodbye.")),
    ),
    "openai-messages": (
        {"id": 17, "messages": [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Thank you"},
            {"role": "assistant", "content": "Merci"},
        ]},
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


# (bad record, a fragment the message must contain); each bad record is written as record #2 of its file.
BAD_RECORDS = {
    "not-an-object-list": (["user", "hi"], "expected a JSON object, got list"),
    "not-an-object-string": ("hello", "expected a JSON object, got str"),
    "turn-missing-value": ({"conversations": [{"from": "user"}, {"from": "assistant", "value": "b"}]},
                           "turn 0 needs 'from' and 'value'"),
    "turn-missing-role": ({"messages": [{"content": "a"}, {"role": "assistant", "content": "b"}]},
                          "turn 0 needs 'from' and 'value' (or 'role' and 'content')"),
    "alpaca-without-output": ({"instruction": "Do it."}, "unknown record format"),
    "alpaca-empty-output": ({"instruction": "Do it.", "output": "  "}, "needs a non-empty 'instruction' and 'output'"),
    "alpaca-null-output": ({"instruction": "Do it.", "output": None}, "needs a non-empty 'instruction' and 'output'"),
    "alpaca-null-instruction": ({"instruction": None, "output": "Done."},
                                "needs a non-empty 'instruction' and 'output'"),
    "alpaca-non-string-input": ({"instruction": "Add.", "input": [1, 2], "output": "3"}, "'input' must be a string"),
    "turns-not-a-list": ({"conversations": "user: hi"}, "'conversations' must be a list of turns"),
    "turn-not-an-object": ({"messages": ["hi", "hello"]}, "turn 0 must be an object"),
    "unknown-role": ({"conversations": turns(("user", "a"), ("narrator", "b"))}, "turn 1: unknown role 'narrator'"),
    "empty-conversation": ({"conversations": []}, "empty conversation"),
    "only-a-system-turn": ({"conversations": turns(("system", "s"))}, "empty conversation"),
    "no-assistant-turn": ({"conversations": turns(("user", "a"))}, "no assistant turn"),
    "two-user-turns-in-a-row": ({"conversations": turns(("user", "a"), ("user", "b"), ("assistant", "c"))},
                                "turn 1: expected a assistant turn, got user"),
    "starts-with-assistant": ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
                              "turn 0: expected a user turn, got assistant"),
    "system-turn-not-first": ({"conversations": turns(("user", "a"), ("assistant", "b"), ("system", "s"),
                                                      ("user", "c"), ("assistant", "d"))},
                              "turn 2: a system turn may only come first"),
    "system-field-and-system-turn": ({"system": "x", "conversations": turns(("system", "s"), ("user", "a"),
                                                                            ("assistant", "b"))},
                                     "both a 'system' field and a system turn"),
    "non-string-system-field": ({"system": 3, "conversations": turns(("user", "a"), ("assistant", "b"))},
                                "'system' must be a string"),
    "non-string-content": ({"conversations": turns(("user", 42), ("assistant", "b"))},
                           "turn 0: content must be a string, got int"),
    "content-parts-list": ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]},
                                         {"role": "assistant", "content": "b"}]},
                           "turn 0: content must be a string, got list"),
    "empty-text": ({"text": "   "}, "'text' must be a non-empty string"),
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


def test_alpaca_null_output_is_a_data_error(tmp_path):
    path = write_records(tmp_path / "data.jsonl", [FILLER, {"instruction": "Do it.", "output": None}], jsonl=True)
    assert load_error(path) == (
        f"{path}: record #1 (line 2): Alpaca record needs a non-empty 'instruction' and 'output'")


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


def test_pretty_printed_json_object_is_not_a_list(tmp_path):
    # A file that does not start with "[" is JSONL; a pretty-printed object then fails on its first line, named.
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"conversations": turns(("user", "a"), ("assistant", "b"))}, indent=1),
                    encoding="utf-8")
    assert load_error(path).startswith(f"{path}: line 1 (record #0): malformed JSON")


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "data.json"
    assert load_error(path) == f"{path}: no such file"


def test_directory_is_not_a_file(tmp_path):
    assert load_error(tmp_path) == f"{tmp_path}: no such file"


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
        f"{path}: file: not UTF-8 text (invalid continuation byte at byte {raw.index(latin1('é'))})")
