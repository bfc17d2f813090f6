"""Stores named on the command line: an SQLite file path or a postgresql:// URL.

The data tools reach every backend through the same repository methods
(dump, load, apply, stats), so export, import and copy work between any
two of them.  A destination SQLite file that does not exist yet is built
beside its final name and renamed into place when complete (kvapp.atomic):
a failed or killed run never leaves a database there.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvapp import atomic, postgres_repository_class
from kvapp.config import Settings
from kvapp.repository import DatabaseUnusable, Repository

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class StoreError(Exception):
    """A store that cannot be used as asked; the message is one line."""


def is_postgres(url: str) -> bool:
    return url.startswith(POSTGRES_SCHEMES)


def show(url: str) -> str:
    """Return url fit for a message: a password in it replaced by ***."""
    if not is_postgres(url):
        return url
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.netloc.rpartition('@')[2]}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def sqlite_path(url: str, command: str) -> Path:
    """Return the SQLite file that url names; StoreError for a PostgreSQL URL."""
    if is_postgres(url):
        raise StoreError(
            f"{command} works on SQLite files; for PostgreSQL use its own tools"
            " (pg_dump, amcheck) or kvapp export"
        )
    return Path(url).resolve()


def same_store(a: str, b: str) -> bool:
    if is_postgres(a) or is_postgres(b):
        return a == b
    return Path(a).resolve() == Path(b).resolve()


def open_store(url: str, settings: Settings, synchronous: str | None = None) -> Any:
    """Return the repository for an existing store at url; StoreError if there is none."""
    if is_postgres(url):
        try:
            repository_class = postgres_repository_class()
        except DatabaseUnusable as exc:
            raise StoreError(str(exc)) from None
        return repository_class(
            url,
            busy_timeout_ms=settings.busy_timeout_ms,
            synchronous=synchronous or settings.synchronous,
        )
    path = Path(url).resolve()
    if not path.is_file():
        raise StoreError(f"no database file at {path}")
    return _sqlite(path, settings, synchronous)


def _sqlite(path: Path, settings: Settings, synchronous: str | None) -> Repository:
    # startup_check_max_bytes=0: the tools read every row anyway, and `check`
    # is the full check; a quick_check at every open would double the reads.
    return Repository(
        str(path),
        busy_timeout_ms=settings.busy_timeout_ms,
        synchronous=synchronous or settings.synchronous,
        startup_check_max_bytes=0,
    )


def is_empty(store: Any) -> bool:
    return not store.dump(None, 1)


@dataclass
class Target:
    """A store that data is written into, and what a failed run must do about it.

    fresh: a new SQLite file built aside, discarded on failure; empty: an
    existing store that held no keys, whose loaded keys a failure deletes;
    neither: keys were merged in, and stay on failure.
    """

    store: Any
    fresh: bool
    empty: bool


@contextmanager
def destination(url: str, settings: Settings, merge: bool) -> Iterator[Target]:
    """Yield the Target for the store at url; a new SQLite file appears only on success.

    An existing store must hold no keys unless merge.
    """
    if not is_postgres(url) and not Path(url).exists():
        path = Path(url).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic.aside(path) as temp:
            # synchronous=OFF: the file is fsynced once, whole, before the rename.
            store = _sqlite(temp, settings, "OFF")
            try:
                yield Target(store, fresh=True, empty=True)
            finally:
                store.close()  # the last connection's close checkpoints and removes the WAL
        return
    store = open_store(url, settings)
    try:
        empty = is_empty(store)
        if not empty and not merge:
            raise StoreError(
                f"{show(url)} already holds keys; give --merge to add to them"
                " (keys in both are replaced)"
            )
        yield Target(store, fresh=False, empty=empty)
    finally:
        store.close()
