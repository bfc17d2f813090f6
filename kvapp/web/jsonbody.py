"""Strict JSON request bodies (RFC 8259), and errors that name the bad field by its path.

Python's json module is lenient where parsers disagree, so each corner is a
400 here: bytes that are not UTF-8 (RFC 8259 section 8.1), a byte order
mark, NaN and Infinity (not JSON at all), and an object with a member name
twice (section 4 leaves the outcome to the parser: some keep the first,
most the last, so a proxy and kvapp could read two different requests).
"""

from __future__ import annotations

import json
import re
from typing import Any

from kvapp.web.responses import BadRequest, HTTPError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Members(list[tuple[str, Any]]):
    """A JSON object as its (name, value) pairs in document order, duplicates kept."""


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON value")


# No field of a kvapp document holds an integer past 20 digits (a ttl is at
# most 2147483647), so a longer one is read as the float it rounds to: past
# 4,300 digits int() raises, and the document is valid JSON (RFC 8259
# section 6 lets a parser limit the range and precision of numbers).  The
# field's own check then refuses it, by name.
def _integer(text: str) -> int | float:
    return int(text) if len(text) <= 20 else float(text)


class _TooManyObjects(Exception):
    pass


def parse_json(data: bytes, max_objects: int) -> Any:
    """Return the JSON value of a body, objects as Members; 400 saying what is wrong.

    Parsing stops at the object after max_objects: a body of empty objects
    ({} is 2 bytes) would otherwise cost about 30 times its size in memory
    and a second of CPU per 4 MiB, measured, before its shape is checked.
    """
    objects = 0

    def pairs(found: list[tuple[str, Any]]) -> Members:
        nonlocal objects
        objects += 1
        if objects > max_objects:
            raise _TooManyObjects
        return Members(found)

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"the body is not valid UTF-8 (byte {exc.start})") from None
    if not text.strip(" \t\r\n"):
        raise BadRequest("the body is empty; send a JSON object such as {}")
    if text.startswith("\ufeff"):
        raise BadRequest("the body starts with a byte order mark; send plain UTF-8 JSON")
    try:
        return json.loads(
            text, object_pairs_hook=pairs, parse_constant=_no_constant, parse_int=_integer
        )
    except _TooManyObjects:
        raise BadRequest(f"the body holds more than {max_objects} JSON objects") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(
            f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise BadRequest("the body is not valid JSON: it is nested too deeply") from None
    except ValueError as exc:  # NaN, Infinity
        raise BadRequest(f"the body is not valid JSON: {str(exc).splitlines()[0]}") from None


def member_path(path: str, name: str) -> str:
    """Return the path of a member: then[0].put, or then[0]["a b"] for an unusual name."""
    if _NAME.fullmatch(name):
        return f"{path}.{name}" if path else name
    shown = json.dumps(name[:40] + ("..." if len(name) > 40 else ""))
    return f"{path}[{shown}]"


def invalid(path: str, problem: str, kind: type[HTTPError] = BadRequest) -> HTTPError:
    """Return the error for a bad field: the message starts with its path."""
    error = kind(f"{path}: {problem}")
    error.field = path
    return error


def members(value: Any, path: str, allowed: tuple[str, ...], what: str) -> dict[str, Any]:
    """Return an object's members by name; 400 if it is no object, repeats or adds a member."""
    if not isinstance(value, Members):
        raise (
            invalid(path, f"must be an object ({what})")
            if path
            else BadRequest(f"the body must be a JSON object ({what})")
        )
    found: dict[str, Any] = {}
    for name, member in value:
        if name in found:
            raise invalid(member_path(path, name), "this member is given twice")
        if name not in allowed:
            raise invalid(member_path(path, name), f"unknown member; {what}")
        found[name] = member
    return found


def array(value: Any, path: str, limit: int, setting: str) -> list[Any]:
    """Return a JSON array of at most limit items; 400 otherwise."""
    if not isinstance(value, list) or isinstance(value, Members):
        raise invalid(path, "must be an array")
    if len(value) > limit:
        raise invalid(path, f"holds {len(value)} items; the limit is {limit} ({setting})")
    return value


def string(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise invalid(path, f"must be a string, not {kind_of(value)}")
    return value


def boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise invalid(path, f"must be true or false, not {kind_of(value)}")
    return value


def kind_of(value: Any) -> str:
    """Return the JSON type of a parsed value, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an object" if isinstance(value, Members) else "an array"
