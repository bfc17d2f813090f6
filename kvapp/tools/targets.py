"""Stores named on the command line: an SQLite file path or a postgresql:// URL.

The data tools reach every backend through the same repository methods
(dump, load, apply, stats), so export, import and copy work between any
two of them.  A destination SQLite file that does not exist yet is built
beside its final name and renamed into place when complete (kvapp.tools.atomicfile):
a failed or killed run never leaves a database there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kvapp.config import Settings
from kvapp.store import open_store
from kvapp.store.base import Store
from kvapp.store.location import (
    LocationError,
    check_location,
    file_path,
    home_expanded,
    is_postgres_url,
    redact,
)
from kvapp.store.sqlite import make_folders
from kvapp.tools import atomicfile


class StoreError(Exception):
    """A store that cannot be used as asked; the message is one line."""


def location(url: str) -> str:
    """Return url if it names an SQLite file or a PostgreSQL database; else StoreError.

    A file's leading ~ or ~user is expanded (the shell leaves `--to=~/kv.sqlite3`
    alone), and a folder is refused, as for the database setting
    (kvapp.store.location.file_path); the path is otherwise returned as given.
    """
    try:
        check_location(url)
        if is_postgres_url(url):
            return url
        named = home_expanded(url, os.environ)
        file_path(named, Path.cwd(), os.environ)  # refuses a folder
        return named
    except LocationError as exc:
        raise StoreError(str(exc)) from None


def sqlite_path(url: str, command: str) -> Path:
    """Return the SQLite file that url names; StoreError for a PostgreSQL URL."""
    if is_postgres_url(location(url)):
        raise StoreError(
            f"{command} works on SQLite files; for PostgreSQL use its own tools"
            " (pg_dump, amcheck) or kvapp export"
        )
    return Path(url).resolve()


def refuse_own_files(target: Path, url: str) -> None:
    """Raise StoreError if target is the SQLite database url names, or a file of it.

    Writing a backup or an export there would destroy what it copies.
    """
    if is_postgres_url(location(url)):
        return
    database = Path(url).resolve()
    own = {database, *(Path(f"{database}{suffix}") for suffix in ("-wal", "-shm", "-gen"))}
    if target.resolve() in own:
        raise StoreError(f"{target.resolve()} is the database itself; name a new file")


def same_store(a: str, b: str) -> bool:
    if is_postgres_url(location(a)) or is_postgres_url(location(b)):
        return a == b
    return Path(a).resolve() == Path(b).resolve()


def open_existing(
    url: str, settings: Settings, synchronous: str | None = None, empty_ok: bool = False
) -> Store:
    """Return the store at url, which must exist; StoreError if there is none.

    SQLiteStore makes a database of an empty file: a destination may be one
    (empty_ok, and it keeps its owner and mode), a source may not.
    """
    if not is_postgres_url(location(url)):
        path = Path(url).resolve()
        if not path.is_file():
            raise StoreError(f"no database file at {path}")
        if path.stat().st_size == 0 and not empty_ok:
            raise StoreError(f"{path} is empty, not a kvapp database")
    return _open(url, settings, synchronous)


def _open(url: str, settings: Settings, synchronous: str | None) -> Store:
    # startup_check_max_bytes=0: the tools read every row anyway, and `check`
    # is the full check; a quick_check at every open would double the reads.
    return open_store(
        settings,
        url if is_postgres_url(url) else str(Path(url).resolve()),
        synchronous=synchronous,
        startup_check_max_bytes=0,
    )


def is_empty(store: Store) -> bool:
    return not store.dump(None, 1)


@dataclass
class Target:
    """A store that data is written into, and what a failed run must do about it.

    fresh: a new SQLite file built aside, discarded on failure; empty: an
    existing store that held no keys, whose loaded keys a failure deletes;
    neither: keys were merged in, and stay on failure.
    """

    store: Store
    fresh: bool
    empty: bool


@contextmanager
def destination(url: str, settings: Settings, merge: bool) -> Iterator[Target]:
    """Yield the Target for the store at url; a new SQLite file appears only on success.

    An existing store must hold no keys unless merge.
    """
    if not is_postgres_url(location(url)) and not Path(url).exists():
        path = Path(url).resolve()
        # Folders made durably: the new file's rename into place is fsynced, and
        # a folder lost in a power cut would take the finished file with it.
        make_folders(path.parent)
        try:
            # replace=False: a database made at path meanwhile (a server
            # started on it) is never replaced by this one.
            with atomicfile.aside(path, replace=False) as temp:
                # synchronous=OFF: the file is fsynced once, whole, before the rename.
                store = _open(str(temp), settings, "OFF")
                try:
                    yield Target(store, fresh=True, empty=True)
                finally:
                    store.close()  # the last connection's close checkpoints and removes the WAL
        except atomicfile.DestinationExists:
            raise StoreError(
                f"{path} appeared while this ran, and is left as it is: run the command"
                " again (with --merge to add to what it holds)"
            ) from None
        return
    store = open_existing(url, settings, empty_ok=True)
    try:
        empty = is_empty(store)
        if not empty and not merge:
            raise StoreError(
                f"{redact(url)} already holds keys; give --merge to add to them"
                " (keys in both are replaced)"
            )
        yield Target(store, fresh=False, empty=empty)
    finally:
        store.close()
