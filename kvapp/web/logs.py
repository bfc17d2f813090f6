"""Logging: one setup for every way of serving, and the access-log line.

wsgi.py (so `waitress-serve wsgi:app`) and `python -m kvapp serve` both call
setup_logging().  The access log never holds a query value, a body, or a
header such as Authorization: values can be secrets.
"""

from __future__ import annotations

import logging
import math
import os
import select
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from string import ascii_letters, digits
from typing import Any
from urllib.parse import quote

from kvapp.config import Settings

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

access = logging.getLogger("kvapp.access")

# Characters kept as they are in a logged path; everything else (spaces, quotes,
# control characters, non-ASCII) is %-escaped so that one request stays one line.
_SAFE = "/!$&'()*+,;:=@-._~"
_MAX_TARGET = 400
# Strings made only of these need no escaping (quote() keeps letters, digits, _.-~).
_PATH_CHARS = frozenset(ascii_letters + digits + "_.-~" + _SAFE)
_QUERY_CHARS = _PATH_CHARS | {"%"}

# Under load an access line reaches the log within FLUSH_INTERVAL seconds.
FLUSH_INTERVAL = 0.05
# Bytes that one write() to a pipe delivers without interleaving (POSIX: at least 512).
PIPE_BUF = getattr(select, "PIPE_BUF", 512)

_writer: LineWriter | None = None  # set by setup_logging when kvapp owns the log output


class LineWriter(logging.Handler):
    """A log handler that writes whole lines to a file descriptor, in bulk under load.

    A line that comes after a quiet FLUSH_INTERVAL is written at once.
    Lines that come faster wait in a deque (append and popleft are atomic:
    the request path takes no lock) and a daemon thread writes them every
    FLUSH_INTERVAL.  So a busy server makes a few write() calls a second
    instead of one per request: each call hands the GIL to another thread,
    which cost about 4% of GET throughput on waitress (two servers loaded
    side by side on two cores, one writing per line, one in bulk).
    Records of WARNING and above are written at once, with everything
    queued before them, and logging.shutdown() at exit writes the rest; a
    kill (SIGKILL, or SIGTERM without a handler) under load loses at most
    the last FLUSH_INTERVAL of access lines.

    Each write() carries whole lines and at most PIPE_BUF bytes when it can,
    so lines of several threads or worker processes never interleave, in a
    pipe (journald, docker) or a file.
    """

    def __init__(
        self,
        fd: int,
        flush_interval: float = FLUSH_INTERVAL,
        _write: Callable[[int, bytes], int] = os.write,
        _monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._monotonic = _monotonic
        self.fd = fd
        self.flush_interval = flush_interval
        self._write = _write
        self._lines: deque[str] = deque()
        # time.monotonic() of the last write; -inf, not 0.0: monotonic() counts
        # from boot, so on a machine up for less than flush_interval 0.0 is recent.
        self._written = -math.inf
        self._writing = threading.Lock()
        self._thread: threading.Thread | None = None
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        # The parent writes what it queued; the child starts afresh.
        self._lines.clear()
        self._writing = threading.Lock()
        self._thread = None

    def write(self, line: str) -> None:
        """Queue one line (ending in a newline); write now if the log was quiet."""
        self._lines.append(line)
        if self._monotonic() - self._written >= self.flush_interval:
            self.flush()
        elif self._thread is None:
            self._start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.append(self.format(record) + "\n")
            if record.levelno >= logging.WARNING:
                self.flush()
            elif self._monotonic() - self._written >= self.flush_interval:
                self.flush()
            elif self._thread is None:
                self._start()
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        """Write every queued line now; a broken log never breaks a request."""
        with self._writing:
            self._written = self._monotonic()
            lines = self._lines
            pending = b""
            while lines or pending:
                chunk = [pending or lines.popleft().encode("utf-8", "backslashreplace")]
                size = len(chunk[0])
                pending = b""
                while lines:
                    data = lines.popleft().encode("utf-8", "backslashreplace")
                    if size + len(data) > PIPE_BUF:
                        pending = data
                        break
                    chunk.append(data)
                    size += len(data)
                data = b"".join(chunk)
                try:
                    while data:
                        data = data[self._write(self.fd, data) :]
                except OSError:
                    pass

    def _start(self) -> None:
        with self._writing:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="kvapp-log-writer", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self.flush_interval)
            if self._lines:
                self.flush()


def setup_logging(settings: Settings) -> None:
    """Send log records to stderr in FORMAT: kvapp's at log_level, access lines if access_log.

    When the program embedding kvapp configured logging already, kvapp's
    records, access lines included, go through that configuration.
    Otherwise they go through one LineWriter on stderr, and access lines skip
    the LogRecord and Formatter machinery (see log_request).
    """
    global _writer
    root = logging.getLogger()
    if not root.handlers:
        try:
            sys.stderr.flush()
            fd = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):  # no real stderr: let logging decide
            logging.basicConfig(format=FORMAT, stream=sys.stderr)
        else:
            writer = LineWriter(fd)
            writer.setFormatter(Formatter(FORMAT))
            root.addHandler(writer)
            _writer = writer
        # waitress warns "Task queue depth is N" for every request that waits
        # for a free thread: with more connections than threads that is one
        # more line per request under ordinary load, and about a tenth of the
        # GIL time of a GET.  The access log's milliseconds show the wait.
        logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    logging.getLogger("kvapp").setLevel(settings.log_level)
    # access_log alone switches the access log: log_level = WARNING quiets
    # kvapp's own records, not the one line per request asked for.
    access.setLevel(logging.INFO if settings.access_log else logging.CRITICAL + 1)


def redact(query: str) -> str:
    """Return a query string with every value replaced by ***; names stay."""
    if "&" not in query:
        name, sep, _ = query.partition("=")
        return name + "=***" if sep else name
    return "&".join(
        name + "=***" if sep else name
        for name, sep, _ in (pair.partition("=") for pair in query.split("&"))
    )


def target(environ: dict[str, Any]) -> str:
    """Return the request's path and redacted query: one bounded, escaped line."""
    path = environ.get("PATH_INFO", "")
    query = environ.get("QUERY_STRING", "")
    text = (
        path
        if _PATH_CHARS.issuperset(path)
        else quote(path.encode("latin-1", "replace"), safe=_SAFE)
    )
    if query:
        query = redact(query)
        if not _QUERY_CHARS.issuperset(query):
            query = quote(query.encode("latin-1", "replace"), safe=_SAFE + "%")
        text += "?" + query
    if len(text) > _MAX_TARGET:
        text = text[:_MAX_TARGET] + "..."
    return text


_ACCESS = '%s "%s %s" %d %d %.1fms'
# FORMAT's layout with the access line in it, for one % operation per line.
_LINE = '%s,%03d INFO kvapp.access: %s "%s %s" %d %d %.1fms\n'
# Methods logged as they are; any other is %-escaped (it could hold anything).
_PLAIN_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"))
_second = -1
_second_text = ""


def _second_of(now: float) -> str:
    """Return the local time of now to the second, as logging.Formatter writes it.

    The text of the current second is kept, so strftime runs once a second.
    """
    global _second, _second_text
    second = int(now)
    if second != _second:
        _second_text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        _second = second
    return _second_text


class Formatter(logging.Formatter):
    """FORMAT's formatter, with the text of the current second cached."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return f"{_second_of(record.created)},{int(record.msecs):03d}"


def log_request(environ: dict[str, Any], status: int, size: int, started: float) -> None:
    """Write the access-log line of one answered request.

    When kvapp owns the log output (setup_logging), the line is formatted
    with one % operation, in FORMAT's layout, and queued on the LineWriter:
    no LogRecord, no Formatter, no handler lock (about 2 us of CPU instead of 15).
    """
    if not access.isEnabledFor(logging.INFO):
        return
    method = environ.get("REQUEST_METHOD", "")
    if method not in _PLAIN_METHODS:
        method = quote(method[:20], safe="")
    remote = environ.get("REMOTE_ADDR") or "-"
    path = target(environ)
    ms = (time.perf_counter() - started) * 1000
    writer = _writer
    if writer is None:
        access.info(_ACCESS, remote, method, path, status, size, ms)
        return
    now = time.time()
    text = _second_text if int(now) == _second else _second_of(now)
    writer.write(_LINE % (text, (now % 1) * 1000, remote, method, path, status, size, ms))
