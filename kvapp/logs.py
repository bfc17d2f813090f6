"""Logging: one setup for every way of serving, and the access-log line.

wsgi.py (so `waitress-serve wsgi:app`) and `python -m kvapp serve` both call
setup_logging().  The access log never holds a query value, a body, or a
header such as Authorization: values can be secrets.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any
from urllib.parse import quote

from kvapp.config import Settings

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

access = logging.getLogger("kvapp.access")

# Characters kept as they are in a logged path; everything else (spaces, quotes,
# control characters, non-ASCII) is %-escaped so that one request stays one line.
_SAFE = "/!$&'()*+,;:=@-._~"
_MAX_TARGET = 400


def setup_logging(settings: Settings) -> None:
    """Send log records to stderr in FORMAT, with kvapp's level from settings.

    basicConfig does nothing when the program embedding kvapp configured logging.
    """
    logging.basicConfig(format=FORMAT, stream=sys.stderr)
    logging.getLogger("kvapp").setLevel(settings.log_level)


def redact(query: str) -> str:
    """Return a query string with every value replaced by ***; names stay."""
    return "&".join(
        name + "=***" if sep else name
        for name, sep, _ in (pair.partition("=") for pair in query.split("&"))
    )


def target(environ: dict[str, Any]) -> str:
    """Return the request's path and redacted query: one bounded, escaped line."""
    path = environ.get("PATH_INFO", "")
    query = environ.get("QUERY_STRING", "")
    text = quote(path.encode("latin-1", "replace"), safe=_SAFE)
    if query:
        text += "?" + quote(redact(query).encode("latin-1", "replace"), safe=_SAFE + "%")
    if len(text) > _MAX_TARGET:
        text = text[:_MAX_TARGET] + "..."
    return text


def log_request(environ: dict[str, Any], status: int, size: int, started: float) -> None:
    """Write the access-log line of one answered request."""
    if not access.isEnabledFor(logging.INFO):
        return
    method = environ.get("REQUEST_METHOD", "")
    access.info(
        '%s "%s %s" %d %d %.1fms',
        environ.get("REMOTE_ADDR") or "-",
        quote(method[:20], safe=""),
        target(environ),
        status,
        size,
        (time.perf_counter() - started) * 1000,
    )
