"""Responses and the HTTP errors that know their status.

Handlers return a Response or raise an HTTPError; kvapp.web.app turns either into
the WSGI start_response call, adding the headers every response carries.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from http import HTTPStatus

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
PROBLEM = "application/problem+json"

# Sent on every response: never cached, never sniffed into HTML, never able to
# run script even if a browser is told to render it.
COMMON_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("Content-Security-Policy", "default-src 'none'; sandbox"),
)

_REASONS = {status.value: f"{status.value} {status.phrase}" for status in HTTPStatus}
_REASONS[507] = "507 Insufficient Storage"


def status_line(code: int) -> str:
    """Return the WSGI status string for code, e.g. '404 Not Found'."""
    return _REASONS.get(code) or f"{code} Unknown"


# qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] ), RFC 9110 section 12.4.2
_QVALUE = re.compile(r"0(\.[0-9]{0,3})?|1(\.0{0,3})?")


def _quality(ranges: list[tuple[str, float]], media_type: str) -> float:
    """Return the q of the most specific range that matches media_type (RFC 9110 12.5.1)."""
    major = media_type.partition("/")[0] + "/*"
    best, rank = 0.0, -1
    for media_range, q in ranges:
        specific = 2 if media_range == media_type else 1 if media_range == major else 0
        if (specific or media_range == "*/*") and specific > rank:
            best, rank = q, specific
    return best


def prefers_json(accept: str | None) -> bool:
    """Return True if the Accept header ranks JSON strictly above plain text.

    No Accept, */* and ties all mean plain text, kvapp's default.  A range with
    a malformed q is ignored, as if it were not there.
    """
    if not accept or ("json" not in accept and "application/" not in accept.lower()):
        return False
    ranges = []
    for element in accept.split(","):
        media_range, *params = element.split(";")
        media_range = media_range.strip().lower()
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                value = value.strip()
                q = float(value) if _QVALUE.fullmatch(value) else -1.0
                break
        if media_range and q >= 0:
            ranges.append((media_range, q))
    json_q = max(_quality(ranges, JSON), _quality(ranges, PROBLEM))
    return json_q > _quality(ranges, "text/plain")


class Response:
    """A status, a body of bytes and its headers; Content-Length is derived.

    A streamed Response (stream is not None) has no Content-Length: its
    body is what stream yields, sent as it comes, until it ends.
    """

    __slots__ = ("status", "body", "content_type", "headers", "stream")

    def __init__(
        self,
        status: int = 200,
        body: bytes = b"",
        content_type: str = TEXT,
        headers: list[tuple[str, str]] | None = None,
        stream: Iterator[bytes] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers if headers is not None else []
        self.stream = stream


class Ending:
    """A streamed body as the server iterates it; once it ends or is closed, done(bytes sent).

    Not a generator's finally: the server closes the body when the client
    goes away, maybe before its first step, and a generator closed then
    never runs its finally.  done runs exactly once, after stream is closed.
    """

    def __init__(self, stream: Iterator[bytes], done: Callable[[int], None]) -> None:
        self._stream = stream
        self._done: Callable[[int], None] | None = done
        self.sent = 0

    def __iter__(self) -> Ending:
        return self

    def __next__(self) -> bytes:
        try:
            chunk = next(self._stream)
        except BaseException:
            self.close()
            raise
        self.sent += len(chunk)
        return chunk

    def close(self) -> None:
        done, self._done = self._done, None
        if done is not None:
            try:
                close = getattr(self._stream, "close", None)
                if close is not None:
                    close()
            finally:
                done(self.sent)


def text(body: str, status: int = 200, headers: list[tuple[str, str]] | None = None) -> Response:
    """Return a plain-text Response; body gets a final newline if it lacks one."""
    if not body.endswith("\n"):
        body += "\n"
    return Response(status, body.encode("utf-8"), TEXT, headers)


class HTTPError(Exception):
    """An error answer; the message is one line that says what was wrong."""

    status = 500
    headers: tuple[tuple[str, str], ...] = ()
    field: str | None = None
    """The path of the bad field of a JSON body (then[2].put), for problem details."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def response(self, as_json: bool = False) -> Response:
        """Return the error as one line of text, or as RFC 9457 problem details if as_json."""
        if not as_json:
            return text(f"{self.message}", self.status, list(self.headers))
        problem = {
            "type": "about:blank",
            "title": HTTPStatus(self.status).phrase,
            "status": self.status,
            "detail": self.message,
        }
        if self.field is not None:
            problem["field"] = self.field  # an extension member (RFC 9457 section 3.2)
        body = json.dumps(problem, ensure_ascii=False).encode("utf-8")
        return Response(self.status, body, PROBLEM, list(self.headers))


class BadRequest(HTTPError):
    status = 400


class Unauthorized(HTTPError):
    status = 401

    def __init__(self, message: str, challenge: str) -> None:
        super().__init__(message)
        self.headers = (("WWW-Authenticate", challenge),)


class Forbidden(HTTPError):
    status = 403


class NotFound(HTTPError):
    status = 404

    def __init__(self, message: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.headers = headers


class MethodNotAllowed(HTTPError):
    status = 405

    def __init__(self, message: str, allow: tuple[str, ...]) -> None:
        super().__init__(message)
        self.headers = (("Allow", ", ".join(allow)),)


class Gone(HTTPError):
    status = 410


class PayloadTooLarge(HTTPError):
    status = 413


class PreconditionFailed(HTTPError):
    status = 412


class UnsupportedMediaType(HTTPError):
    status = 415


class InternalServerError(HTTPError):
    status = 500


class ServiceUnavailable(HTTPError):
    status = 503

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.headers = (("Retry-After", str(retry_after)),)


class InsufficientStorage(HTTPError):
    status = 507
