"""Responses and the HTTP errors that know their status.

Handlers return a Response or raise an HTTPError; kvapp.app turns either into
the WSGI start_response call, adding the headers every response carries.
"""

from __future__ import annotations

from http import HTTPStatus

TEXT = "text/plain; charset=utf-8"

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


class Response:
    """A status, a body of bytes and its headers; Content-Length is derived."""

    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(
        self,
        status: int = 200,
        body: bytes = b"",
        content_type: str = TEXT,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers if headers is not None else []


def text(body: str, status: int = 200, headers: list[tuple[str, str]] | None = None) -> Response:
    """Return a plain-text Response; body gets a final newline if it lacks one."""
    if not body.endswith("\n"):
        body += "\n"
    return Response(status, body.encode("utf-8"), TEXT, headers)


class HTTPError(Exception):
    """An error answer; the message is one line that says what was wrong."""

    status = 500
    headers: tuple[tuple[str, str], ...] = ()

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def response(self) -> Response:
        return text(f"{self.message}", self.status, list(self.headers))


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


class MethodNotAllowed(HTTPError):
    status = 405

    def __init__(self, message: str, allow: tuple[str, ...]) -> None:
        super().__init__(message)
        self.headers = (("Allow", ", ".join(allow)),)


class PayloadTooLarge(HTTPError):
    status = 413


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
