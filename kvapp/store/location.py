"""Where a store lives: an SQLite file path or a postgresql:// URL, told apart by one rule.

A location that starts with a URL scheme (RFC 3986 section 3.1: a letter,
then letters, digits, '+', '-' or '.', then ':') is a URL.  Only
postgresql:// and postgres:// URLs name a store; any other URL is refused,
never taken as a file name (`pgsql://host/db` would otherwise create the
folders `pgsql:/host/` and an SQLite file `db` in them).  A file whose name
starts like a scheme can still be named as `./name:...`.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")


class LocationError(ValueError):
    """A database location that names no store kvapp can use; the message is one line."""


def is_postgres_url(location: str) -> bool:
    """Return True if location names a PostgreSQL database rather than an SQLite file."""
    return location.startswith(POSTGRES_SCHEMES)


def check_location(location: str) -> str:
    """Return location if it is an SQLite file path or a postgresql:// URL; else LocationError."""
    if not location.strip():
        raise LocationError("the database location is empty")
    if is_postgres_url(location) or not _SCHEME.match(location):
        return location
    raise LocationError(
        f"{redact(location)!r} is not a supported database: only postgresql:// URLs"
        " and file paths are supported"
    )


def home_expanded(value: str, environ: Mapping[str, str]) -> str:
    """Return value with a leading ~ or ~user made that home folder; LocationError for no user.

    As git does for its path settings: taken literally, `database =
    ~/kv.sqlite3` made a folder named ~.
    """
    if value == "~" or value.startswith("~/"):
        return str(environ.get("HOME") or os.path.expanduser("~")) + value[1:]
    if value.startswith("~"):
        expanded = os.path.expanduser(value)
        if expanded == value:
            user = value[1:].partition("/")[0]
            raise LocationError(f"{value}: there is no user {user!r}")
        return expanded
    return value


def resolved(path: Path) -> Path:
    """Return path made absolute, its symbolic links followed; LocationError for a loop of them."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:  # RuntimeError: a loop (Python 3.11 and 3.12)
        raise LocationError(f"{path} cannot be resolved ({exc})") from None


def file_path(value: str, base: Path, environ: Mapping[str, str]) -> Path:
    """Return the file value names, absolute and resolved; LocationError if it names a folder.

    A relative value is relative to base, and a leading ~ is expanded
    (home_expanded).  A value ending in / names a folder, and resolving it
    drops the slash, so `data/` made a file named data.
    """
    value = home_expanded(value, environ)
    if value.endswith(("/", os.sep)):
        raise LocationError(f"{value} names a folder: add a file name")
    path = resolved(base / value)
    # os.path.isdir, not Path.is_dir, which raises for a folder on the way
    # that this user may not search (the store then says what is wrong).
    if os.path.isdir(path):
        raise LocationError(f"{path} is a folder: name a file in it")
    return path


def redact(location: str) -> str:
    """Return location fit for a message or a log line: a URL's password replaced by ***."""
    if "://" not in location:
        return location
    try:
        parts = urllib.parse.urlsplit(location)
        password = parts.password
    except ValueError:
        return location.partition("://")[0] + "://***"
    if password is None:
        return location
    user = urllib.parse.quote(urllib.parse.unquote(parts.username or ""), safe="")
    netloc = f"{user}:***@{parts.netloc.rpartition('@')[2]}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
