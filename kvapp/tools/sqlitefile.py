"""Whole-file operations on an SQLite database: online backup, full check, statistics.

These read a database file that may be live (a server writing it), damaged,
or not kvapp's at all, so they open it themselves, read-only where they can,
instead of through SQLiteStore, whose startup would refuse a damaged file or
change a foreign one.  Their SQL reads kvapp's schema, which kvapp.store.sqlite
owns: the expected shape comes from its SCHEMA statements, not a copy.
"""

from __future__ import annotations

import os
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from kvapp.store.sqlite import SCHEMA, SCHEMA_VERSION, SQLITE_MAGIC, UPGRADES

# Pages copied per backup step: each step returns to Python, for the progress
# bar and so that a signal can stop the backup between steps.
BACKUP_STEP_PAGES = 1024


class NotUsable(Exception):
    """The file cannot be read as kvapp's SQLite database; the message is one line."""


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def _reading(path: Path) -> Iterator[sqlite3.Connection]:
    """Yield a connection that reads the SQLite file at path, inside one read transaction.

    The read transaction is one snapshot of a WAL database: writers go on,
    and nothing they commit meanwhile is seen (https://sqlite.org/wal.html).
    """
    if not path.is_file():
        raise NotUsable(f"no database file at {path}")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise NotUsable(f"cannot read {path}: {exc.strerror}") from None
    if magic != SQLITE_MAGIC:
        raise NotUsable(f"{path} is not an SQLite database")
    # Read-write when allowed, though nothing is written: the last connection
    # to close then removes the -wal and -shm files that opening a WAL
    # database creates; a read-only one would leave them behind.
    writable = os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)
    mode = "rw" if writable else "ro"
    # A WAL database opened read-only needs a -shm file, and on a read-only
    # filesystem (a backup on a read-only mount) none can be made:
    # SQLITE_CANTOPEN.  With no -wal beside it the file is the whole
    # database, and immutable=1 reads it without locks or -shm
    # (https://sqlite.org/uri.html#uriimmutable).  The file may still change
    # through another mount of its folder (a server starting): the read
    # counts only if the file and its -wal are as they were at the end.
    immutable = bool(os.statvfs(path).f_flag & os.ST_RDONLY) and not _wal_beside(path)
    if immutable:
        mode = "ro&immutable=1"
    before = _state(path)
    try:
        conn = sqlite3.connect(
            f"file:{urllib.parse.quote(str(path))}?mode={mode}", uri=True, isolation_level=None
        )
    except sqlite3.Error as exc:
        raise NotUsable(f"cannot open {path}: {_first_line(exc)}") from None
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("BEGIN")
        # The read transaction starts at the first read.
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        yield conn
        if immutable and (_state(path) != before or _wal_beside(path)):
            raise NotUsable(
                f"{path} changed while it was read (a server may be using it through another"
                " mount); run the command again when nothing writes it"
            )
    except sqlite3.Error as exc:
        raise NotUsable(f"{path}: {_first_line(exc)}") from None
    finally:
        conn.close()


def _wal_beside(path: Path) -> bool:
    return Path(f"{path}-wal").exists()


def _state(path: Path) -> tuple[int, int, int]:
    """Return what any write to the file changes: its inode, size and modification time."""
    info = path.stat()
    return info.st_ino, info.st_size, info.st_mtime_ns


def _expected_columns() -> dict[str, list[tuple]]:
    """Return PRAGMA table_info of each of kvapp's tables, as kvapp.store.sqlite creates them."""
    reference = sqlite3.connect(":memory:")
    try:
        for statement in SCHEMA:
            reference.execute(statement)
        return {table: _columns(reference, table) for table in ("kv", "meta", "changes")}
    finally:
        reference.close()


def _columns(conn: sqlite3.Connection, table: str) -> list[tuple]:
    # (name, type, notnull, default, pk); the cid in front is only the order.
    return [row[1:] for row in conn.execute(f"PRAGMA table_info({table})")]


def schema_problems(conn: sqlite3.Connection) -> list[str]:
    """Return what makes the database unlike kvapp's schema, one line each; [] when it is alike."""
    problems = []
    expected_columns = _expected_columns()
    changes = expected_columns.pop("changes")
    for table, expected in expected_columns.items():
        found = _columns(conn, table)
        if not found:
            problems.append(f"table {table} is missing: this is not a kvapp database")
        elif found != expected:
            problems.append(f"table {table} has other columns than kvapp's schema")
    if problems:
        return problems
    meta = dict(conn.execute("SELECT name, value FROM meta"))
    version = meta.get("schema_version")
    if version == SCHEMA_VERSION:
        if _columns(conn, "changes") != changes:
            problems.append("table changes is missing or has other columns than kvapp's schema")
    elif version not in UPGRADES:  # an older version kvapp upgrades when it opens it is fine
        problems.append(f"schema version is {version!r}; this kvapp knows {SCHEMA_VERSION}")
    revision = meta.get("revision")
    if type(revision) is not int:
        problems.append(f"meta revision is {revision!r}, not a whole number")
        return problems
    highest = conn.execute("SELECT max(revision) FROM kv").fetchone()[0]
    if highest is not None and highest > revision:
        # A later write would reuse an ETag that a stored key already has.
        problems.append(f"a key has revision {highest}, above the store's revision {revision}")
    bad = conn.execute(
        "SELECT count(*) FROM kv WHERE typeof(key) != 'text' OR typeof(value) != 'blob'"
        " OR typeof(content_type) != 'text' OR content_type = ''"
        " OR typeof(revision) != 'integer' OR revision < 1"
        " OR (expires_at IS NOT NULL AND typeof(expires_at) != 'integer')"
    ).fetchone()[0]
    if bad:
        problems.append(f"{bad} rows hold values of the wrong type for kvapp's schema")
    return problems


def check(path: Path) -> list[str]:
    """Return every problem PRAGMA integrity_check and kvapp's schema checks find; [] when sound.

    integrity_check reads every page and index entry
    (https://sqlite.org/pragma.html#pragma_integrity_check), so it takes time
    in proportion to the file.
    """
    with _reading(path) as conn:
        try:
            rows = [row[0] for row in conn.execute("PRAGMA integrity_check")]
        except sqlite3.DatabaseError as exc:  # damage bad enough to stop the check itself
            return [f"integrity_check: {_first_line(exc)}"]
        if rows != ["ok"]:
            return [f"integrity_check: {row}" for row in rows]
        return schema_problems(conn)


def stats(path: Path) -> dict[str, object]:
    """Return figures about the database at path, all from one snapshot."""
    now = int(time.time() * 1000)
    with _reading(path) as conn:
        problems = schema_problems(conn)
        if problems:
            raise NotUsable(f"{path}: {problems[0]}")
        keys, expiring, key_bytes, value_bytes = conn.execute(
            "SELECT count(*), count(expires_at), total(length(CAST(key AS BLOB))),"
            " total(length(value)) FROM kv WHERE expires_at IS NULL OR expires_at > ?",
            (now,),
        ).fetchone()
        expired = conn.execute("SELECT count(*) FROM kv WHERE expires_at <= ?", (now,)).fetchone()[
            0
        ]
        meta = dict(conn.execute("SELECT name, value FROM meta"))
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        free_pages = conn.execute("PRAGMA freelist_count").fetchone()[0]
    return {
        "database": str(path),
        "schema_version": meta["schema_version"],
        "revision": meta["revision"],
        "keys": keys,
        "expiring_keys": expiring,
        "expired_rows": expired,
        "key_bytes": int(key_bytes),
        "value_bytes": int(value_bytes),
        "file_bytes": _size(path),
        "wal_bytes": _size(Path(f"{path}-wal")),
        "free_bytes": free_pages * page_size,
    }


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def backup(
    source: Path, target: Path, progress: Callable[[int, int], None] = lambda done, total: None
) -> int:
    """Copy the database at source into a new file target, online; return its pages.

    The SQLite backup API (https://sqlite.org/backup.html) copies the pages
    of one snapshot: the source's read transaction stays open across every
    step, so writers go on (WAL) and the copy is the database as it was when
    the backup began.  Without that held transaction, each step would read
    the newest state and restart the copy whenever another connection wrote,
    which under steady writes might never finish.  progress(done, total) is
    called after each step, in pages.
    """
    with _reading(source) as conn:
        problems = schema_problems(conn)
        if problems:
            raise NotUsable(f"{source}: {problems[0]}")
        copy = sqlite3.connect(target, isolation_level=None)
        try:
            return _copy(conn, copy, progress)
        except sqlite3.Error as exc:
            # The backup API reports a failed read of the source and a failed
            # write of the copy alike: name both files.
            raise NotUsable(f"cannot back {source} up into {target}: {_first_line(exc)}") from None
        finally:
            copy.close()


def _copy(
    conn: sqlite3.Connection, copy: sqlite3.Connection, progress: Callable[[int, int], None]
) -> int:
    """Back conn's snapshot up into the empty database copy; return the copy's pages."""
    # The target is a new temporary file, fsynced as a whole at the end
    # (kvapp.tools.atomicfile), so it needs no journal and no fsync per step.
    copy.execute("PRAGMA journal_mode = OFF")
    copy.execute("PRAGMA synchronous = OFF")

    def step(status: int, remaining: int, total: int) -> None:
        progress(total - remaining, total)

    conn.backup(copy, pages=BACKUP_STEP_PAGES, progress=step)
    # The copy carries the source's WAL flag in its header, so this read
    # already opens it as the WAL database it will be.
    rows = [row[0] for row in copy.execute("PRAGMA quick_check")]
    if rows != ["ok"]:
        raise NotUsable(f"the copy failed PRAGMA quick_check: {rows[0]}")
    return copy.execute("PRAGMA page_count").fetchone()[0]
