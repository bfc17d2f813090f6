"""POST /txn: conditions on several keys, then one branch of puts, deletes and gets, atomically.

The shape follows etcd's Txn (compare, success, failure) and Consul's
/v1/txn, in JSON a person can type:

    {"if":   [{"key": "a", "etag": "\\"41\\""}, {"key": "b", "exists": false}],
     "then": [{"put": "a", "value": "1", "ttl": 30}, {"delete": "b"}, {"get": "c"}],
     "else": [{"get": "a"}]}

The whole document is checked before anything is applied, so a bad field
stores nothing.  The transaction is one Write (kvapp.store.base): the
planner checks its conditions and applies the branch in the transaction
that group commit gives it, so what the conditions saw is what its writes
replace.  Every get of a branch reads that same state, before the branch's
own writes (a get of a key the branch puts answers the value it replaces).
"""

from __future__ import annotations

import binascii
import json
from typing import Any, NamedTuple

from kvapp.config import Settings
from kvapp.store.base import (
    ANY,
    MAX_TTL_SECONDS,
    OCTET_STREAM,
    Change,
    Check,
    Condition,
    Delete,
    InvalidInput,
    Item,
    Outcome,
    Put,
    Store,
    Write,
    check_content_type,
    check_key,
    check_ttl,
    show,
)
from kvapp.web.decoding import named_params
from kvapp.web.etags import etag, revision_of
from kvapp.web.jsonbody import array, boolean, invalid, members, parse_json, string
from kvapp.web.request import Request
from kvapp.web.responses import JSON, TEXT, PayloadTooLarge, Response

TOP = ("if", "then", "else")
CONDITION = ("key", "etag", "exists")
VERBS = ("put", "delete", "get")
PUT_MEMBERS = ("put", "value", "value_base64", "content_type", "ttl")
OPERATION = (*PUT_MEMBERS, "delete", "get")


class Branch(NamedTuple):
    """One parsed branch: the Write's part of it, and each operation as (verb, key) in order."""

    changes: tuple[Change, ...]
    reads: tuple[str, ...]
    operations: list[tuple[str, str]]


class Transactions:
    """The /txn route function, bound to one repository and one Settings."""

    def __init__(self, repository: Store, settings: Settings) -> None:
        self.repository = repository
        self.max_key_bytes = settings.max_key_bytes
        self.max_value_bytes = settings.max_value_bytes
        self.max_body_bytes = settings.max_body_bytes
        self.max_txn_ops = settings.max_txn_ops

    def txn(self, request: Request) -> Response:
        """POST /txn: 200 with succeeded, revision and the results of the branch taken."""
        named_params(request.query, ())  # a typo'd option must not write regardless
        # The document, each condition, and each operation of both branches.
        max_objects = 1 + 3 * self.max_txn_ops
        document = members(
            parse_json(request.json(self.max_body_bytes), max_objects),
            "",
            TOP,
            "a transaction has if, then, else",
        )
        checks = tuple(
            self._condition(item, f"if[{index}]")
            for index, item in enumerate(
                array(document.get("if", []), "if", self.max_txn_ops, "max_txn_ops")
            )
        )
        then = self._branch(document.get("then", []), "then")
        otherwise = self._branch(document.get("else", []), "else")
        write = Write(
            then.changes,
            then.reads,
            checks,
            Write(otherwise.changes, otherwise.reads),
            read_limit=self.max_body_bytes,
        )
        outcome = self.repository.apply(write)
        taken = then if outcome.succeeded else otherwise
        answer = {
            "succeeded": outcome.succeeded,
            "revision": outcome.revision,
            "results": _results(taken, outcome),
        }
        body = json.dumps(answer, ensure_ascii=False).encode("utf-8")
        return Response(200, body, JSON)

    def _key(self, value: Any, path: str) -> str:
        try:
            return check_key(string(value, path), self.max_key_bytes)
        except InvalidInput as exc:
            raise invalid(path, str(exc)) from None

    def _condition(self, item: Any, path: str) -> Check:
        fields = members(item, path, CONDITION, "a condition has key and etag or exists")
        if "key" not in fields:
            raise invalid(path, "a condition needs a key")
        key = self._key(fields["key"], f"{path}.key")
        if ("etag" in fields) == ("exists" in fields):
            raise invalid(path, "give exactly one of etag and exists")
        if "exists" in fields:
            exists = boolean(fields["exists"], f"{path}.exists")
            return Check(key, Condition(if_match=ANY) if exists else Condition(if_none_match=ANY))
        revision = revision_of(string(fields["etag"], f"{path}.etag"))
        if revision is None:
            raise invalid(f"{path}.etag", 'must be an ETag as kvapp sends it, such as "\\"42\\""')
        return Check(key, Condition(if_match=frozenset((revision,))))

    def _branch(self, value: Any, path: str) -> Branch:
        changes: list[Change] = []
        reads: list[str] = []
        operations: list[tuple[str, str]] = []
        written: dict[str, str] = {}
        read: dict[str, str] = {}
        for index, item in enumerate(array(value, path, self.max_txn_ops, "max_txn_ops")):
            where = f"{path}[{index}]"
            fields = members(item, where, OPERATION, "an operation is put, delete or get")
            verbs = [verb for verb in VERBS if verb in fields]
            if len(verbs) != 1:
                raise invalid(where, "give exactly one of put, delete and get")
            verb = verbs[0]
            allowed = PUT_MEMBERS if verb == "put" else (verb,)
            for name in fields:
                if name not in allowed:
                    raise invalid(f"{where}.{name}", f"is not a member of a {verb} operation")
            key = self._key(fields[verb], f"{where}.{verb}")
            operations.append((verb, key))
            seen = read if verb == "get" else written
            if key in seen:
                done = "read" if verb == "get" else "written"
                raise invalid(
                    f"{where}.{verb}", f"the key {show(key)} is already {done} by {seen[key]}"
                )
            seen[key] = where
            if verb == "get":
                reads.append(key)
                continue
            changes.append(self._put(fields, key, where) if verb == "put" else Delete(key))
        return Branch(tuple(changes), tuple(reads), operations)

    def _put(self, fields: dict[str, Any], key: str, where: str) -> Put:
        if ("value" in fields) == ("value_base64" in fields):
            raise invalid(where, "a put needs exactly one of value and value_base64")
        if "value" in fields:
            path, default_type = f"{where}.value", TEXT
            try:
                value = string(fields["value"], path).encode("utf-8")
            except UnicodeEncodeError:
                raise invalid(path, "holds a lone surrogate; send bytes as value_base64") from None
        else:
            path, default_type = f"{where}.value_base64", OCTET_STREAM
            text = string(fields["value_base64"], path)
            try:
                value = binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
            except (UnicodeEncodeError, binascii.Error):
                raise invalid(path, "is not base64 (RFC 4648 section 4, padded)") from None
            # "AB==" decodes as "AA==" does: accept one spelling per value (RFC 4648 3.5).
            if binascii.b2a_base64(value, newline=False) != text.encode("ascii"):
                raise invalid(path, "is not canonical base64: its unused bits must be 0") from None
        if len(value) > self.max_value_bytes:
            raise invalid(
                path,
                f"the value is {len(value)} bytes; the limit is {self.max_value_bytes}",
                PayloadTooLarge,
            )
        content_type = default_type
        if "content_type" in fields:
            content_type = string(fields["content_type"], f"{where}.content_type")
            try:
                check_content_type(content_type)
            except InvalidInput as exc:
                raise invalid(f"{where}.content_type", str(exc)) from None
        ttl = None
        if "ttl" in fields:
            ttl = _seconds(fields["ttl"])
            if ttl is None:
                number = "a JSON number" if isinstance(fields["ttl"], str) else "a whole number"
                raise invalid(
                    f"{where}.ttl", f"must be {number} of seconds from 1 to {MAX_TTL_SECONDS}"
                )
        return Put(key, value, content_type, ttl)


def _seconds(number: Any) -> int | None:
    """Return a JSON number that is a whole number of seconds in range, or None.

    30.0 and 3e1 are 30, as JSON (RFC 8259 section 6) and JSON Schema's
    "integer" have it; 30.5, true and "30" are not numbers of seconds.
    """
    if isinstance(number, float) and number.is_integer():
        number = int(number)
    if isinstance(number, bool) or not isinstance(number, int):
        return None
    try:
        return check_ttl(number)
    except InvalidInput:
        return None


def _results(branch: Branch, outcome: Outcome) -> list[dict[str, Any]]:
    """Return the answer of each operation of the branch taken, in its order."""
    results: list[dict[str, Any]] = []
    existed = iter(outcome.existed)
    items = iter(outcome.items)
    for verb, key in branch.operations:
        if verb == "put":
            results.append(
                {"put": key, "etag": etag(outcome.revision), "created": not next(existed)}
            )
        elif verb == "delete":
            results.append({"delete": key, "deleted": next(existed)})
        else:
            results.append({"get": key, **_found(next(items))})
    return results


def _found(item: Item | None) -> dict[str, Any]:
    if item is None:
        return {"found": False}
    try:
        value: dict[str, str] = {"value": item.value.decode("utf-8")}
    except UnicodeDecodeError:
        value = {"value_base64": binascii.b2a_base64(item.value, newline=False).decode("ascii")}
    return {"found": True, **value, "content_type": item.content_type, "etag": etag(item.revision)}
