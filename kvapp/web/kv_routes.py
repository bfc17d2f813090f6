"""The /kv/ routes: each key as an HTTP resource (PUT, GET, HEAD, DELETE) and the listing.

Conditional requests follow RFC 9110 section 13: ETags name versions, If-Match
and If-None-Match guard writes (412), and a read whose If-None-Match matches
answers 304.
"""

from __future__ import annotations

import json
from urllib.parse import quote, urlencode

from kvapp.config import Settings
from kvapp.store.base import (
    MAX_TTL_SECONDS,
    OCTET_STREAM,
    Condition,
    Delete,
    InvalidInput,
    Put,
    Store,
    Write,
    check_content_type,
    check_key,
    show,
)
from kvapp.web.decoding import environ_bytes, key_param, named_params, request_path, utf8
from kvapp.web.etags import condition, etag
from kvapp.web.request import Request
from kvapp.web.responses import (
    JSON,
    TEXT,
    BadRequest,
    NotFound,
    PreconditionFailed,
    Response,
    prefers_json,
)
from kvapp.web.watch import Watching, split_watch

DEFAULT_LIMIT, MAX_LIMIT = 1000, 10_000


def query_params(request: Request, allowed: tuple[str, ...]) -> dict[str, bytes]:
    """Return the query's parameters by name; 400 for an unknown or repeated one."""
    return named_params(request.query, allowed)


def read_conditions(
    request: Request, revision: int, headers: list[tuple[str, str]]
) -> Response | None:
    """Return the 304 that If-None-Match earns, or None; 412 if If-Match fails.

    Evaluated in the order of RFC 9110 section 13.2.2, for GET and HEAD of a
    key that exists.
    """
    found = condition(request.environ)
    if found is None:
        return None
    check_if_match(found, revision)
    if not Condition(if_none_match=found.if_none_match).holds(revision):
        return Response(304, headers=headers)
    return None


def check_if_match(found: Condition | None, revision: int) -> None:
    """Raise the 412 that If-Match earns for the version at revision, if it does."""
    if found is not None and not Condition(if_match=found.if_match).holds(revision):
        raise PreconditionFailed("If-Match names another version of this key")


def positive_int(value: bytes, name: str, maximum: int) -> int:
    """Return value as an integer from 1 to maximum; 400 otherwise."""
    if not (value.isdigit() and value.isascii() and len(value) <= 20):
        raise BadRequest(f"{name} must be a whole number from 1 to {maximum}")
    number = int(value)
    if not 1 <= number <= maximum:
        raise BadRequest(f"{name} must be a whole number from 1 to {maximum}, not {number}")
    return number


class Resources:
    """The /kv/ route functions, bound to one repository and one Settings."""

    def __init__(self, repository: Store, settings: Settings, watching: Watching) -> None:
        self.repository = repository
        self.max_key_bytes = settings.max_key_bytes
        self.max_value_bytes = settings.max_value_bytes
        self.watching = watching

    def _key(self, request: Request) -> str:
        """Return the key: the rest of the raw path after /kv/, percent-decoded as UTF-8."""
        prefix = environ_bytes(request.header("SCRIPT_NAME"), "the path") + b"/kv/"
        path = request_path(request.environ)
        return check_key(utf8(path[len(prefix) :], "the key"), self.max_key_bytes)

    def _location(self, request: Request, key: str) -> str:
        """Return the key's URL path: a "." or ".." segment with its dots escaped.

        A client resolving a literal /kv/n/../b would remove the dot segments
        (RFC 3986 section 5.2.4) and ask for the key b; %2E is not a dot segment.
        """
        segments = (
            segment.replace(".", "%2E") if segment in (".", "..") else segment
            for segment in quote(key, safe="/").split("/")
        )
        return f"{request.header('SCRIPT_NAME')}/kv/{'/'.join(segments)}"

    def get(self, request: Request) -> Response:
        """GET or HEAD /kv/{key}: the value with its Content-Type and ETag; 304; 404.

        With If-None-Match and Prefer: wait=N (RFC 7240), a request whose
        If-None-Match names the current version waits up to N seconds for
        the key to change (a long-poll), then answers as usual.
        """
        key = self._key(request)
        query_params(request, ())
        current = self.repository.get(key)
        if current is not None:
            # If-Match comes first (RFC 9110 section 13.2.2): a 412 never waits.
            check_if_match(condition(request.environ), current.revision)
        item, applied = self.watching.long_poll(request, current, lambda: self.repository.get(key))
        if item is None:
            raise NotFound(f"no such key: {show(key)}", tuple(applied))
        headers = [("ETag", etag(item.revision)), ("Cache-Control", "no-cache"), *applied]
        not_modified = read_conditions(request, item.revision, headers)
        if not_modified is not None:
            return not_modified
        return Response(200, item.value, item.content_type, headers)

    def put(self, request: Request) -> Response:
        """PUT /kv/{key}[?ttl=N]: store the body exactly; 201 new, 204 replaced, 412."""
        key = self._key(request)
        params = query_params(request, ("ttl",))
        ttl = positive_int(params["ttl"], "ttl", MAX_TTL_SECONDS) if "ttl" in params else None
        content_type = request.header("CONTENT_TYPE").strip() or OCTET_STREAM
        try:
            check_content_type(content_type)
        except InvalidInput as exc:
            raise BadRequest(f"Content-Type: {exc}") from None
        write_condition = condition(request.environ)
        value = request.body(self.max_value_bytes)
        outcome = self.repository.apply(
            Write.of(Put(key, value, content_type, ttl, write_condition))
        )
        headers = [("ETag", etag(outcome.revision))]
        if outcome.existed[0]:
            return Response(204, headers=headers)
        headers.append(("Location", self._location(request, key)))
        return Response(201, headers=headers)

    def delete(self, request: Request) -> Response:
        """DELETE /kv/{key}: 204 when deleted, 404 when absent, 412 when a condition fails."""
        key = self._key(request)
        query_params(request, ())
        outcome = self.repository.apply(Write.of(Delete(key, condition(request.environ))))
        if not outcome.existed[0]:
            raise NotFound(f"no such key: {show(key)}")
        return Response(204)

    def list(self, request: Request) -> Response:
        """GET or HEAD /kv/?prefix=p&limit=n&after=k: live keys in UTF-8 byte order.

        GET /kv/?watch is the change stream instead (kvapp.web.watch).
        """
        watch, rest = split_watch(request.query)
        if watch:
            if request.method != "GET":
                raise BadRequest("a watch is a GET request: HEAD /kv/?watch has no stream")
            return self.watching.stream(request, rest)
        params = query_params(request, ("prefix", "limit", "after"))
        prefix = utf8(params.get("prefix", b""), "prefix")
        if prefix:
            key_param(prefix, "prefix", self.max_key_bytes)
        limit = positive_int(params["limit"], "limit", MAX_LIMIT) if "limit" in params else None
        after = utf8(params["after"], "after") if params.get("after") else None
        if after is not None:
            key_param(after, "after", self.max_key_bytes)
        page = limit or DEFAULT_LIMIT
        revision, keys = self.repository.list_keys(prefix, after, page + 1)
        cursor = keys[page - 1] if len(keys) > page else None
        keys = keys[:page]
        # The store's revision at the snapshot listed: watch from it to miss nothing.
        headers = [("Vary", "Accept"), ("X-Kvapp-Revision", str(revision))]
        if cursor is not None:
            query = {"prefix": prefix} if prefix else {}
            if limit is not None:
                query["limit"] = str(limit)
            query["after"] = cursor
            link = f"{request.header('SCRIPT_NAME')}/kv/?{urlencode(query, quote_via=quote)}"
            headers.append(("Link", f'<{link}>; rel="next"'))
        if prefers_json(request.header("HTTP_ACCEPT")):
            body = json.dumps({"keys": keys, "next": cursor}, ensure_ascii=False)
            return Response(200, body.encode("utf-8"), JSON, headers)
        body = "".join(f"{key}\n" for key in keys)
        return Response(200, body.encode("utf-8"), TEXT, headers)
