"""Logging: one setup for every way of serving, and the access-log line.

wsgi.py (so `waitress-serve wsgi:app`) and `python -m kvapp serve` both call
setup_logging().  The access log never holds a query value, a body, or a
header such as Authorization: values can be secrets.
"""

from __future__ import annotations

import logging
import os
import sys
import time
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

_writer: LineWriter | None = None  # set by setup_logging when kvapp owns the log output


class LineWriter(logging.Handler):
    """A log handler that writes each line to a file descriptor with one write() call.

    One system call per line and no stream buffer or lock in between: each
    write() of a whole line lands in one piece, even with several threads or
    worker processes writing (a pipe takes up to PIPE_BUF bytes atomically, a
    file takes one write() whole).  Nothing is held back, so no line is lost
    when the process is killed.
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def write(self, line: str) -> None:
        """Write one line (ending in a newline); a broken log never breaks a request."""
        data = line.encode("utf-8", "backslashreplace")
        try:
            while data:
                data = data[os.write(self.fd, data) :]
        except OSError:
            pass

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


def setup_logging(settings: Settings) -> None:
    """Send log records to stderr in FORMAT, with kvapp's level from settings.

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
    with one % operation, in FORMAT's layout, and written by the LineWriter:
    no LogRecord, no Formatter, no handler lock (about 3 us of CPU instead of 15).
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
