"""The WSGI callable: routing, and the one boundary where errors become answers."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from kvapp.config import Settings
from kvapp.store.base import (
    ConditionFailed,
    InvalidInput,
    ReadsTooLarge,
    StorageError,
    StorageFull,
    Store,
    show,
)
from kvapp.store.metricsfile import MetricsStore, metrics_path
from kvapp.store.sweeper import Sweeper
from kvapp.web.guard import Guard
from kvapp.web.kv_routes import Resources
from kvapp.web.logs import log_request, target
from kvapp.web.metrics import Metrics
from kvapp.web.ops_routes import Operations
from kvapp.web.request import Request
from kvapp.web.responses import (
    COMMON_HEADERS,
    BadRequest,
    Ending,
    HTTPError,
    InsufficientStorage,
    InternalServerError,
    MethodNotAllowed,
    NotFound,
    PreconditionFailed,
    Response,
    ServiceUnavailable,
    prefers_json,
    status_line,
)
from kvapp.web.seed_routes import Handlers
from kvapp.web.txn_routes import Transactions
from kvapp.web.watch import Watching

log = logging.getLogger("kvapp")

Handler = Callable[[Request], Response]

KEY_PREFIX = "/kv/"
KEY_ROUTE = "/kv/{key}"
UNMATCHED = "unmatched"
# Metric labels take these methods as they are and any other as "other", so a
# client cannot make up new label values.
KNOWN_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"))
# RFC 9110 section 8.6: no Content-Length (nor content) in a 204 or 304.
NO_CONTENT = frozenset((204, 304))
# How long close() waits for the tail's refresher, as the sweeper's stop() waits for its thread.
JOIN_SECONDS = 5

# Forks of this process so far, so that a request notices a fork without os.getpid().
_forks = 0


def _forked() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_forked)


class App:
    """kvapp's WSGI application."""

    def __init__(self, settings: Settings, repository: Store) -> None:
        self.settings = settings
        self.repository = repository
        self.guard = Guard(settings.allowed_hosts, settings.auth_token)
        self.access_log = settings.access_log
        store = MetricsStore(
            metrics_path(settings.database, settings.metrics_path), settings.busy_timeout_ms
        )
        self.metrics = Metrics(store)
        repository.on_commit = self.metrics.observe_commit
        self.sweeper = Sweeper(
            repository,
            settings.sweep_interval_seconds,
            settings.watch_history_seconds,
            settings.watch_history_max,
        )
        self._threads_fork = -1  # _forks when this process started the threads
        handlers = Handlers(repository, settings)
        self.watching = Watching(repository, settings)
        resources = Resources(repository, settings, self.watching)
        operations = Operations(repository, self.metrics)
        self.routes: dict[str, dict[str, Handler]] = {
            "/": {"GET": handlers.index, "HEAD": handlers.index},
            "/set": {"GET": handlers.set, "POST": handlers.set},
            "/get": {"GET": handlers.get, "HEAD": handlers.get},
            "/delete": {"GET": handlers.delete, "POST": handlers.delete},
            KEY_PREFIX: {"GET": resources.list, "HEAD": resources.list},
            "/healthz": {"GET": operations.healthz, "HEAD": operations.healthz},
            "/metrics": {"GET": operations.metrics_page, "HEAD": operations.metrics_page},
            "/openapi.json": {"GET": operations.openapi, "HEAD": operations.openapi},
            "/txn": {"POST": Transactions(repository, settings).txn},
        }
        # Every longer path under /kv/ names a key.
        self.key_methods: dict[str, Handler] = {
            "GET": resources.get,
            "HEAD": resources.get,
            "PUT": resources.put,
            "DELETE": resources.delete,
        }

    def route(self, path: str) -> str:
        """Return the route template that path falls under, for metrics: /kv/{key}, unmatched."""
        if path in self.routes:
            return path
        return KEY_ROUTE if path.startswith(KEY_PREFIX) else UNMATCHED

    def match(self, method: str, path: str) -> Handler:
        """Return the handler for method and path; raise NotFound, or 405 with Allow."""
        methods = self.routes.get(path)
        if methods is None:
            if not path.startswith(KEY_PREFIX):
                raise NotFound("no such path; see GET / for usage")
            methods, path = self.key_methods, KEY_ROUTE
        handler = methods.get(method)
        if handler is None:
            raise MethodNotAllowed(f"{path} does not accept this method", tuple(methods))
        return handler

    def respond(self, environ: dict[str, Any]) -> Response:
        """Return the Response for one request; never raises an Exception."""
        try:
            request = Request(environ)
            request.host = self.guard.check(request)
            return self.match(request.method, request.path)(request)
        except HTTPError as exc:
            error = exc
        except InvalidInput as exc:
            error = BadRequest(str(exc))
        except ConditionFailed as exc:
            error = PreconditionFailed(
                f"precondition failed: the key {show(exc.key)} is not at the version that"
                " If-Match or If-None-Match asks for; nothing was changed"
            )
        except ReadsTooLarge as exc:
            error = BadRequest(f"{exc} (max_body_bytes); get fewer keys; nothing was changed")
        except StorageError as exc:
            error = (InsufficientStorage if isinstance(exc, StorageFull) else ServiceUnavailable)(
                str(exc)
            )
        except Exception:
            log.exception(
                "unhandled error for %.20r %s", environ.get("REQUEST_METHOD"), target(environ)
            )
            error = InternalServerError("internal error; the server log has the details")
        return error.response(prefers_json(environ.get("HTTP_ACCEPT")))

    def _start_threads(self) -> None:
        """Start the metrics flusher and the sweeper in this process (again after a fork)."""
        self._threads_fork = _forks
        self.metrics.start()
        self.sweeper.start()

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        started = time.perf_counter()
        if self._threads_fork != _forks:
            self._start_threads()
        response = self.respond(environ)
        body = response.body
        headers = [*COMMON_HEADERS, *response.headers]
        if response.stream is not None:
            headers.append(("Content-Type", response.content_type))
        elif response.status not in NO_CONTENT:
            headers += [("Content-Type", response.content_type), ("Content-Length", str(len(body)))]
        for name, _ in response.headers:
            if name == "Cache-Control":
                break
        else:
            headers.append(("Cache-Control", "no-store"))
        start_response(status_line(response.status), headers)
        if response.stream is not None:
            return Ending(response.stream, lambda sent: self._observe(environ, 200, sent, started))
        empty = environ.get("REQUEST_METHOD") == "HEAD" or response.status in NO_CONTENT
        self._observe(environ, response.status, 0 if empty else len(body), started)
        return [] if empty else [body]

    def _observe(self, environ: dict[str, Any], status: int, sent: int, started: float) -> None:
        """Write the access line and count the request in the metrics."""
        method = environ.get("REQUEST_METHOD", "GET")
        if self.access_log:
            log_request(environ, status, sent, started)
        self.metrics.observe_request(
            self.route(environ.get("PATH_INFO") or "/"),
            method if method in KNOWN_METHODS else "other",
            status,
            time.perf_counter() - started,
        )

    def fit_threads(self, threads: int) -> None:
        """The server runs this many threads: an automatic max_watchers is half of them."""
        self.watching.fit_threads(threads)

    def end_streams(self) -> None:
        """End the watch streams and long-polls of this process: the server is stopping."""
        self.watching.end_streams()

    def close(self) -> None:
        self.watching.end_streams()
        # The tail's refresher reads the store: a read that opened a
        # connection after the store closed would recreate its -wal and -shm.
        self.watching.tail.join(JOIN_SECONDS)
        self.sweeper.stop()
        self.metrics.close()
        self.repository.close()
