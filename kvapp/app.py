"""The WSGI callable: routing, and the one boundary where errors become answers."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from kvapp.config import Settings
from kvapp.guard import Guard
from kvapp.handlers import Handlers
from kvapp.http import (
    COMMON_HEADERS,
    HTTPError,
    InsufficientStorage,
    InternalServerError,
    MethodNotAllowed,
    NotFound,
    Response,
    ServiceUnavailable,
    status_line,
)
from kvapp.logs import log_request, target
from kvapp.repository import Repository, StorageError, StorageFull
from kvapp.request import Request

log = logging.getLogger("kvapp")

Handler = Callable[[Request], Response]


class App:
    """kvapp's WSGI application."""

    def __init__(self, settings: Settings, repository: Repository) -> None:
        self.settings = settings
        self.repository = repository
        self.guard = Guard(settings.allowed_hosts, settings.auth_token)
        self.access_log = settings.access_log
        handlers = Handlers(repository, settings)
        self.routes: dict[str, dict[str, Handler]] = {
            "/": {"GET": handlers.index, "HEAD": handlers.index},
            "/set": {"GET": handlers.set, "POST": handlers.set},
            "/get": {"GET": handlers.get, "HEAD": handlers.get},
        }

    def match(self, method: str, path: str) -> Handler:
        """Return the handler for method and path; raise NotFound, or 405 with Allow."""
        methods = self.routes.get(path)
        if methods is None:
            raise NotFound("no such path; see GET / for usage")
        handler = methods.get(method)
        if handler is None:
            raise MethodNotAllowed(f"{path} does not accept this method", tuple(methods))
        return handler

    def respond(self, environ: dict[str, Any]) -> Response:
        """Return the Response for one request; never raises an Exception."""
        try:
            request = Request(environ)
            self.guard.check(request)
            return self.match(request.method, request.path)(request)
        except HTTPError as exc:
            return exc.response()
        except StorageError as exc:
            status = InsufficientStorage if isinstance(exc, StorageFull) else ServiceUnavailable
            return status(str(exc)).response()
        except Exception:
            log.exception(
                "unhandled error for %.20r %s", environ.get("REQUEST_METHOD"), target(environ)
            )
            return InternalServerError("internal error; the server log has the details").response()

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        started = time.perf_counter() if self.access_log else 0.0
        response = self.respond(environ)
        body = response.body
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(body))),
            *COMMON_HEADERS,
            *response.headers,
        ]
        if not any(name == "Cache-Control" for name, _ in response.headers):
            headers.append(("Cache-Control", "no-store"))
        start_response(status_line(response.status), headers)
        head = environ.get("REQUEST_METHOD") == "HEAD"
        if self.access_log:
            log_request(environ, response.status, 0 if head else len(body), started)
        return [] if head else [body]

    def close(self) -> None:
        self.repository.close()
