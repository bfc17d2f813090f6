"""The export file: kvapp's records as JSON Lines, binary-safe, one record per line.

Format version 1, one JSON object per line, UTF-8, each line ending in \\n:

    {"format":"kvapp-export","version":1}
    {"key":"hi","content_type":"text/plain","revision":7,"expires_at":null,"value":"hello"}
    {"key":"logo","content_type":"image/png","revision":9,"expires_at":1767225600000,"value_b64":"iVBORw=="}
    {"records":2}

- The first line is the header; a reader refuses a version it does not know.
- Each record line has exactly the fields key, content_type, revision (the
  key's ETag), expires_at (unix milliseconds, or null for no expiry), and one
  of value (the value's bytes when they are valid UTF-8, as a JSON string) or
  value_b64 (any other bytes, in canonical standard base64 with padding, RFC 4648
  section 4).  Either way the value's bytes come back exactly.
- Text is UTF-8 as is, but for U+0085, U+2028 and U+2029, which are
  written as \\u escapes: whatever splits the file into lines finds one
  record per line.
- Keys are in strictly increasing UTF-8 byte order, as export writes them:
  a duplicate or out-of-order key is an error, so two files pasted together
  or a line repeated cannot pass.
- The last line counts the records.  A file cut short (a full disk, a closed
  pipe) has no such line and is refused as a whole.

Every problem is a FormatError naming the line; an import fails on it
without changing its destination.
"""

from __future__ import annotations

import base64
import binascii
import json
import json.encoder
from collections.abc import Iterable, Iterator

from kvapp.store.base import InvalidInput, Record, check_content_type, check_key, show

FORMAT = "kvapp-export"
VERSION = 1
HEADER = {"format": FORMAT, "version": VERSION}
MAX_INTEGER = 2**63 - 1  # SQLite and PostgreSQL BIGINT
# Every later write takes the next revision: a store imported at BIGINT's
# largest value could never write again.  Up to 2**62 leaves 2**62 more
# (146 years at a billion writes a second).
MAX_REVISION = 2**62

_FIELDS = ("key", "content_type", "revision", "expires_at")
_TEXT_FIELDS = frozenset((*_FIELDS, "value"))
_BINARY_FIELDS = frozenset((*_FIELDS, "value_b64"))


class FormatError(ValueError):
    """A line that is not version 1 of the export format; the message names the line."""

    def __init__(self, line: int, problem: str) -> None:
        super().__init__(f"line {line}: {problem}")
        self.line = line


# Characters that some line splitters (Python's str.splitlines, JavaScript
# before ES2019) take for line ends, though JSON does not escape them.
_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_string = json.encoder.encode_basestring  # a JSON string literal, non-ASCII kept
_DECODER = json.JSONDecoder()


def _finish(text: str) -> bytes:
    """Return one JSON text as its line.

    ensure_ascii=False: keys and text values stay readable UTF-8.  Python's
    str never holds a lone surrogate here (keys and values came from UTF-8),
    so the output is always valid UTF-8.  Outside strings JSON holds none of
    _LINE_BREAKS, so escaping them changes no value.
    """
    if not text.isascii() and ("\x85" in text or "\u2028" in text or "\u2029" in text):
        text = text.translate(_LINE_BREAKS)
    return (text + "\n").encode("utf-8")


def _line(obj: dict) -> bytes:
    return _finish(_ENCODER.encode(obj))


def header() -> bytes:
    return _line(HEADER)


def trailer(count: int) -> bytes:
    return _line({"records": count})


def encode(record: Record) -> bytes:
    """Return the line for record: value as text when it is UTF-8, else value_b64.

    Built by hand from json's own string escaper, three times as fast as
    encoding a dict, and the same bytes (tests/test_exportfile.py).
    """
    try:
        value = ',"value":' + _string(record.value.decode("utf-8"))
    except UnicodeDecodeError:
        value = ',"value_b64":"' + base64.b64encode(record.value).decode("ascii") + '"'
    expires_at = "null" if record.expires_at is None else str(record.expires_at)
    text = (
        f'{{"key":{_string(record.key)},"content_type":{_string(record.content_type)},'
        f'"revision":{record.revision},"expires_at":{expires_at}{value}}}'
    )
    return _finish(text)


def _int(value: object, minimum: int, maximum: int = MAX_INTEGER) -> bool:
    """Return True for a whole number from minimum to maximum (SQLite's largest INTEGER)."""
    return type(value) is int and minimum <= value <= maximum  # type(): a bool is no int


def _parse(number: int, raw: bytes) -> object:
    """Return the JSON value that one line holds; FormatError if it is not exactly one."""
    try:
        # raw_decode on the stripped line: json.loads would guess the
        # encoding and match whitespace with regular expressions, at a third
        # of the cost of a whole import.
        text = raw.decode("utf-8").strip(" \t\r\n")
        obj, end = _DECODER.raw_decode(text)
    except UnicodeDecodeError:
        raise FormatError(number, "not UTF-8") from None
    except RecursionError:  # [[[[... : no record is nested at all
        raise FormatError(number, "not valid JSON: nested too deeply") from None
    except ValueError:
        raise FormatError(number, "not valid JSON") from None
    if end != len(text):
        raise FormatError(number, "not valid JSON: more than one value on the line")
    return obj


def decode(number: int, obj: object, max_key_bytes: int) -> Record:
    """Return the Record that line number holds; raise FormatError saying what is wrong."""
    if type(obj) is not dict or (obj.keys() != _TEXT_FIELDS and obj.keys() != _BINARY_FIELDS):
        got = (
            ", ".join(show(name, 20) for name in sorted(obj)) if type(obj) is dict else "no object"
        )
        raise FormatError(
            number,
            "a record has exactly the fields key, content_type, revision, expires_at"
            f" and one of value or value_b64 (got {got})",
        )
    key, content_type = obj["key"], obj["content_type"]
    if type(key) is not str:
        raise FormatError(number, "key must be a string")
    try:
        check_key(key, max_key_bytes)
    except InvalidInput as exc:
        raise FormatError(number, str(exc)) from None
    if type(content_type) is not str:
        raise FormatError(number, "content_type must be a string")
    try:  # the rule of every write: what the server stores, import takes, and only that
        check_content_type(content_type)
    except InvalidInput as exc:
        raise FormatError(number, f"content_type: {exc}") from None
    revision, expires_at = obj["revision"], obj["expires_at"]
    if not _int(revision, 1, MAX_REVISION):
        raise FormatError(number, f"revision must be a whole number from 1 to {MAX_REVISION}")
    if expires_at is not None and not _int(expires_at, 0):
        raise FormatError(number, "expires_at must be null or unix milliseconds (a whole number)")
    if "value" in obj:
        text = obj["value"]
        if type(text) is not str:
            raise FormatError(number, "value must be a string (use value_b64 for other bytes)")
        try:
            value = text.encode("utf-8")
        except UnicodeEncodeError:
            raise FormatError(number, "value holds a lone surrogate escape") from None
    else:
        encoded = obj["value_b64"]
        if type(encoded) is not str:
            raise FormatError(number, "value_b64 must be a string")
        try:
            value = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise FormatError(number, "value_b64 is not valid base64") from None
        # Canonical only (RFC 4648 section 3.5), as /txn's value_base64: "QR=="
        # and "QQ==" would be two spellings of one value.
        if base64.b64encode(value).decode("ascii") != encoded:
            raise FormatError(number, "value_b64 is not canonical base64 (RFC 4648)")
    return Record(key, value, content_type, revision, expires_at)


def read(lines: Iterable[bytes], max_key_bytes: int) -> Iterator[Record]:
    """Yield the records of an export file's lines; raise FormatError at the first bad line.

    Consuming the whole iterator checks the whole file, the final line included.
    """
    number = 0
    previous: str | None = None
    count = 0
    ended = False
    for number, raw in enumerate(lines, start=1):
        if ended:
            raise FormatError(number, "a line after the last line (the record count)")
        if number == 1:
            _check_header(raw)
            continue
        obj = _parse(number, raw)
        if isinstance(obj, dict) and set(obj) == {"records"}:
            if not _int(obj["records"], 0) or obj["records"] != count:
                raise FormatError(
                    number, f"the file says it holds {obj['records']!r} records, not {count}"
                )
            ended = True
            continue
        record = decode(number, obj, max_key_bytes)
        # UTF-8 byte order is code point order, which is how Python compares str.
        if previous is not None and record.key <= previous:
            raise FormatError(
                number,
                "keys must be in strictly increasing UTF-8 byte order, as export writes them"
                " (a key repeats or is out of order)",
            )
        previous = record.key
        count += 1
        yield record
    if number == 0:
        raise FormatError(1, "the file is empty; expected the header line")
    if not ended:
        raise FormatError(
            number + 1, "the file ends without its last line (the record count): it is cut short"
        )


def _check_header(raw: bytes) -> None:
    try:
        obj = _parse(1, raw)
    except FormatError:
        obj = None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise FormatError(1, f"not a kvapp export: the first line must be {header().decode()!r}")
    if type(obj.get("version")) is not int or obj["version"] != VERSION or set(obj) != set(HEADER):
        raise FormatError(
            1, f"format version {obj.get('version')!r}; this kvapp reads version {VERSION}"
        )
