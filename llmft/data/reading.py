"""Reading a data file into raw records, each with where it came from, before any record is parsed.

Accepted files: a JSON list of records, or JSONL (one record a line), in UTF-8 (a leading byte-order mark is
skipped). A JSONL file is read line by line, so a large file never sits in memory whole; a JSON list is parsed whole.

Every problem is reported as a `DataError` that names the file and the record (its position, and its line in JSONL),
so a bad record in a million is found in seconds. What a record must hold is `llmft.data.records`' business.
"""

from __future__ import annotations

import json
import os
from typing import BinaryIO, Callable, Iterator

from llmft.errors import DataError


def iter_records(path: str) -> Iterator[tuple[int, str, object]]:
    """(index, where, raw record) triples; `where` names the file, the record's position and line for error messages."""
    for index, _, where, record in iter_raw_records(path):
        yield index, where, record


BadLineHandler = Callable[[DataError, int, int], None]  # on_bad_line(error, record index, line number)


def iter_raw_records(
    path: str, on_bad_line: BadLineHandler | None = None
) -> Iterator[tuple[int, int | None, str, object]]:
    """(index, line or None, where, raw record) for every record. A JSONL line that is not UTF-8 or not JSON raises
    a DataError, unless `on_bad_line(error, index, line)` is given: then it is told and reading goes on (the line
    still takes its record index). A JSON list is parsed whole, so a malformed one always raises."""
    check_data_file(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4096).lstrip(BOM).lstrip()
            f.seek(0)
            if not head:
                raise DataError(f"{path}: the file is empty")
            if head.startswith(b"["):
                yield from _iter_json_list(f, path)
            else:
                yield from _iter_jsonl(f, path, on_bad_line)
    except OSError as e:  # e.g. a read error on a network file system after the open succeeded
        raise DataError(f"{path}: cannot be read: {e.strerror or e}") from None


def data_file_problem(path: str) -> str | None:
    """Why `path` is not a data file ("is a directory ...", "is a FIFO ...", "no such file"), or None when it is a
    regular file (or a link to one)."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "no such file"
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory, not a data file (give the path of a .json or .jsonl file)"
    kind = {stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a character device"}
    what = next((name for test, name in kind.items() if test(mode)), "a block device")
    return f"is {what}, not a regular file: give the path of a .json or .jsonl file"


def check_data_file(path: str) -> None:
    """Raises a DataError unless `path` is a file this process can open for reading."""
    if (problem := data_file_problem(path)) is not None:
        raise DataError(f"{path}: {problem}")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise DataError(f"{path}: cannot be read: {e.strerror or e}") from None


BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark, as some editors write: not part of the first record


def _decode(raw: bytes, path: str, where: str) -> str:
    """UTF-8 text of `raw` without a leading byte-order mark; byte offsets in errors count the mark."""
    skipped = len(BOM) if raw.startswith(BOM) else 0
    try:
        return raw[skipped:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: {where}: not UTF-8 text ({e.reason} at byte {e.start + skipped})") from None


def _iter_jsonl(
    f: BinaryIO, path: str, on_bad_line: BadLineHandler | None = None
) -> Iterator[tuple[int, int, str, object]]:
    index = 0
    for line_no, raw in enumerate(f, start=1):
        try:
            line = _decode(raw, path, f"line {line_no}")
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))  # so a record cut short is at its line's end, not the next
            except json.JSONDecodeError as e:
                spread = _spread_over_lines(f, line, line_no, e)
                raise DataError(
                    f"{path}: line {line_no} (record #{index}): {spread or f'malformed JSON: {json_problem(e)}'}"
                ) from None
            except (ValueError, RecursionError) as e:  # an integer of over 4300 digits; nesting deeper than Python's
                raise DataError(
                    f"{path}: line {line_no} (record #{index}): unreadable JSON: {_json_limit(e)}"
                ) from None
        except DataError as e:
            if on_bad_line is None:
                raise
            on_bad_line(e, index, line_no)
            index += 1
            continue
        yield index, line_no, f"{path}: record #{index} (line {line_no})", record
        index += 1


PRETTY_PRINT_SCAN = 16 << 20  # bytes read past a bad JSONL line to see whether a record continues on later lines


def _spread_over_lines(f: BinaryIO, line: str, line_no: int, error: json.JSONDecodeError) -> str | None:
    """Why a JSONL line that is cut short does not parse, when the reason is that its record goes on over the lines
    after it (pretty-printed JSON); None otherwise. Leaves `f` where it was."""
    if error.pos < len(line.rstrip()):
        return None  # the line is wrong before its end, not merely incomplete
    position = f.tell()
    rest = f.read(PRETTY_PRINT_SCAN).decode("utf-8", errors="replace")
    f.seek(position)
    text = line + rest
    try:
        _, end = json.JSONDecoder().raw_decode(text.lstrip(), 0)
    except (ValueError, RecursionError):
        return None
    last = line_no + text.lstrip()[:end].count("\n")
    whole = line_no == 1 and not text.lstrip()[end:].strip()
    if whole:
        return (
            f"the file is one whole JSON document spread over lines 1-{last} (pretty-printed JSON), neither a "
            "JSON list of records nor JSONL: give a list ([{...}, {...}]), or JSONL with each record on one line"
        )
    return (
        f"a JSON record spread over lines {line_no}-{last} (pretty-printed JSON): in JSONL each record must be "
        "on one line"
    )


def json_problem(error: json.JSONDecodeError) -> str:
    """What is wrong and where in the line, e.g. "Expecting value at column 15"; json's message for an open string
    already ends in "starting at", which gets the column without a second "at"."""
    return f"{error.msg}{'' if error.msg.endswith(' at') else ' at'} column {error.colno}"


def _json_limit(error: BaseException) -> str:
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return str(error)


def _iter_json_list(f: BinaryIO, path: str) -> Iterator[tuple[int, None, str, object]]:
    # The whole list is parsed at once: a JSON list cannot be split without parsing it. Use JSONL for files too
    # large for memory.
    text = _decode(f.read(), path, "file")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except (ValueError, RecursionError) as e:
        raise DataError(f"{path}: unreadable JSON: {_json_limit(e)}") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records")
    if not records:
        raise DataError(f"{path}: the file holds an empty JSON list: no records to train on")
    for index, record in enumerate(records):
        yield index, None, f"{path}: record #{index}", record
