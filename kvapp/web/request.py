"""The request as kvapp sees it: method, path, query bytes and a bounded body."""

from __future__ import annotations

import re
from typing import Any

from kvapp.web.decoding import environ_bytes
from kvapp.web.responses import JSON, BadRequest, PayloadTooLarge, UnsupportedMediaType

FORM = "application/x-www-form-urlencoded"
# The charset parameter of a UTF-8 body, plain or quoted (RFC 9110 section 8.3.1).
UTF8_CHARSETS = ("charset=utf-8", 'charset="utf-8"')
# Bytes that no request-target holds raw (RFC 9112 section 3.2, RFC 3986
# section 3.5): a fragment stays with the client, and spaces and control
# characters are percent-encoded.  waitress's urlsplit drops them quietly
# ('/kv/a#b' would be the key 'a', '/set?t<TAB>e=1' would store 'te'), so
# the request would mean something other than what was sent.
_NOT_IN_A_TARGET = re.compile(r"[\x00-\x20#\x7f]")


def header_text(value: str) -> str:
    """Return a header value as its sender wrote it, for an error message to quote.

    WSGI hands header bytes over as latin-1 characters (PEP 3333), and senders
    write UTF-8: "é" would be quoted back as "Ã©".  Bytes that are not UTF-8
    show as U+FFFD.  Only for messages: the rules read the bytes.
    """
    if value.isascii():
        return value
    try:
        raw = value.encode("latin-1")
    except UnicodeEncodeError:  # a server that decoded the bytes itself
        return value
    return raw.decode("utf-8", "replace")


class Request:
    """One WSGI environ, read lazily and strictly."""

    __slots__ = ("environ", "host", "method", "path", "query")

    def __init__(self, environ: dict[str, Any]) -> None:
        raw = _NOT_IN_A_TARGET.search(environ.get("REQUEST_URI", ""))
        if raw is not None:
            found = raw.group()
            raise BadRequest(
                "the request target holds a raw '#': send it as %23 (a fragment is not sent)"
                if found == "#"
                else f"the request target holds a raw space or control character"
                f" (byte 0x{ord(found):02x}); percent-encode it"
            )
        self.environ = environ
        self.method: str = environ.get("REQUEST_METHOD", "GET")
        self.path: str = environ.get("PATH_INFO", "") or "/"
        self.query: bytes = environ_bytes(environ.get("QUERY_STRING", ""), "the query string")
        # (host, port) of the Host header, normalized, once the guard has allowed it.
        self.host: tuple[str, str] | None = None

    def header(self, name: str, default: str = "") -> str:
        """Return a request header by its CGI name (e.g. 'HTTP_HOST'), or default."""
        return self.environ.get(name, default)

    def body(self, limit: int) -> bytes:
        """Return the whole body; 413 if Content-Length is over limit, before reading it."""
        raw_length = self.environ.get("CONTENT_LENGTH") or "0"
        if not raw_length.isdigit() or not raw_length.isascii():
            raise BadRequest("Content-Length is not a number")
        # int() refuses more than 4300 digits (a guard against quadratic
        # conversion); 20 digits exceed any real length, and are short to echo.
        digits = raw_length.lstrip("0") or "0"
        if len(digits) > 20:
            raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
        length = int(digits)
        if length > limit:
            raise PayloadTooLarge(f"the request body is {length} bytes; the limit is {limit}")
        if length == 0:
            return b""
        data = self.environ["wsgi.input"].read(length)
        if len(data) != length:
            raise BadRequest("the request body is shorter than its Content-Length")
        return data

    def form(self, limit: int) -> bytes:
        """Return an application/x-www-form-urlencoded body; 415 for any other type."""
        content_type = self.environ.get("CONTENT_TYPE", "")
        media_type, _, params = content_type.partition(";")
        media_type = media_type.strip().lower()
        data = self.body(limit)
        if not data and not media_type:
            return data
        if media_type != FORM:
            raise UnsupportedMediaType(
                f"the body must be {FORM} (curl -d or --data-urlencode), not {content_type[:60]!r}"
            )
        charset = params.strip().lower()
        if charset and charset.replace(" ", "") not in UTF8_CHARSETS:
            raise UnsupportedMediaType("form bodies must be UTF-8")
        return data

    def json(self, limit: int) -> bytes:
        """Return an application/json body; 415 for any other type, before reading it.

        At most the parameter charset=utf-8 (JSON is UTF-8, RFC 8259 section
        8.1), written as RFC 9110 section 5.6.6 has it: no space around "=".
        """
        content_type = self.environ.get("CONTENT_TYPE", "")
        media_type, *params = content_type.split(";")
        allowed = len(params) < 2 and all(
            param.strip(" \t").lower() in UTF8_CHARSETS for param in params
        )
        if media_type.strip(" \t").lower() != JSON or not allowed:
            raise UnsupportedMediaType(
                f"the body must be {JSON} (UTF-8), not {content_type[:60]!r}"
            )
        return self.body(limit)
