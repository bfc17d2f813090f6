"""Every line of SQL, the SQLite connections, transactions and storage errors.

Durability: WAL mode with synchronous=FULL makes SQLite fsync the WAL on every
COMMIT (https://sqlite.org/pragma.html#pragma_synchronous), so a write is on
disk before we acknowledge it.  Readers use one connection per thread and never
wait for the writer (https://sqlite.org/wal.html).  Writes in this process take
one lock and one connection, so threads queue in Python instead of spinning in
SQLite's busy handler; busy_timeout only covers other processes.

Group commit (kvapp.store.groupcommit): apply() hands each Write to a GroupCommit, so
the writes of concurrent requests share one transaction and one fsync.
Reads are served from a per-process cache when the shared generation
counters say it is current (kvapp.store.readcache, which explains why that is
exact across processes).
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from kvapp.store.base import (
    CLOSED,
    EXPIRED,
    NOTHING_STORED,
    PAGE_BYTES,
    DatabaseUnusable,
    Event,
    History,
    Item,
    Listing,
    Outcome,
    Put,
    Record,
    Result,
    StorageBusy,
    StorageError,
    StorageFull,
    StorageUnavailable,
    Write,
    gave_up,
    key_range,
)
from kvapp.store.feed import Feed
from kvapp.store.groupcommit import GroupCommit
from kvapp.store.plan import NewRow, history_cut, plan
from kvapp.store.readcache import (
    MISS,
    Generations,
    GenerationsUnavailable,
    LockTimeout,
    ReadCache,
    generations_path,
)

SCHEMA_VERSION = 2
SQLITE_MAGIC = b"SQLite format 3\x00"

# The change log (kvapp.store.base): one row per change, written in the
# transaction of the change.  A table with a rowid, not WITHOUT ROWID: rows
# carry values of up to max_value_bytes, and SQLite advises rowid tables for
# rows larger than about a twentieth of a page
# (https://sqlite.org/withoutrowid.html#when_to_use_without_rowid).
CHANGES = """CREATE TABLE changes (
        revision     INTEGER NOT NULL,  -- the Write's revision
        n            INTEGER NOT NULL,  -- 0, 1, ... within the revision
        key          TEXT NOT NULL,
        kind         TEXT NOT NULL,     -- put, delete, expired
        value        BLOB,              -- put only, as content_type and expires_at
        content_type TEXT,
        expires_at   INTEGER,
        committed_at INTEGER NOT NULL,  -- unix milliseconds, for watch_history_seconds
        PRIMARY KEY (revision, n)
    )"""

# Statements run one by one inside BEGIN IMMEDIATE (executescript would commit first).
SCHEMA = (
    """CREATE TABLE meta (
        name  TEXT PRIMARY KEY NOT NULL,
        value INTEGER NOT NULL
    )""",
    """CREATE TABLE kv (
        key          TEXT PRIMARY KEY NOT NULL,  -- BINARY collation: UTF-8 byte order
        value        BLOB NOT NULL,
        content_type TEXT NOT NULL,
        revision     INTEGER NOT NULL,           -- meta.revision of the last write
        expires_at   INTEGER                     -- unix milliseconds, NULL: never
    )""",
    CHANGES,
    f"INSERT INTO meta (name, value) VALUES ('schema_version', {SCHEMA_VERSION}), ('revision', 0),"
    " ('history_floor', 0)",
)

# Version 1 had no change log: its history starts at its current revision.
UPGRADE_FROM_1 = (
    CHANGES,
    "INSERT INTO meta (name, value)"
    " SELECT 'history_floor', value FROM meta WHERE name = 'revision'",
    f"UPDATE meta SET value = {SCHEMA_VERSION} WHERE name = 'schema_version'",
)

# How often the watchers' listener looks at the -gen file's commit counter
# for other processes' commits: the most an event from another process waits.
LISTEN_POLL_SECONDS = 0.01

# What brings each older schema version to SCHEMA_VERSION, in place, at start.
UPGRADES = {1: UPGRADE_FROM_1}

# Added at every start when missing, so version 1 databases made before it
# gain it in place.  An index changes no query's answer and older kvapp
# versions ignore it, so it needs no new SCHEMA_VERSION.  Partial: only rows
# with a TTL are in it, so the sweeper finds expired rows without a full scan.
INDEXES = (
    "CREATE INDEX IF NOT EXISTS kv_expires_at ON kv (expires_at) WHERE expires_at IS NOT NULL",
)

# The disk space /healthz asks for before it calls the database writable.
HEALTH_MIN_FREE_BYTES = 1024 * 1024

# A batch may wait busy_timeout_ms for the write lock of another process,
# then fails.  One still applying this long after that waits for the disk
# (an fsync that does not return: a dying disk, a hung network filesystem),
# which no timeout of SQLite or of Python can end: the writes behind it then
# fail at once (kvapp.store.groupcommit) instead of holding every thread.
STALLED_BEYOND_BUSY = 1.0
STALLED_FOR = "the last commit has waited {:.0f} s for the disk"
# The file at the database's path is not the one opened (renamed or deleted).
MOVED = "the database file was moved or deleted{stored}; put it back"


# Bytes of memory each process's read cache may hold (kvapp.store.readcache); 0: no cache.
READ_CACHE_BYTES = 32 * 1024 * 1024

# SQLite's page cache of each reader connection, in KiB (SQLite's default is
# 2 MiB per connection).  A server runs one reader per thread, and granian
# runs dozens of threads: at 2 MiB each, a large database filled some 50 MB
# of page caches with copies of pages the OS already caches.  A point lookup
# touches a handful of pages; the rest come from the OS cache.
READER_PAGE_CACHE_KIB = 256

# Keys per statement of a batch: looked up in one SELECT ... IN (...), put in
# one multi-row INSERT (5 of SQLite's 32,766 host parameters per row,
# https://sqlite.org/limits.html#max_variable_number), deleted in one DELETE.
# One statement instead of one step per row: under load each step is a GIL
# hand-off that waits behind other threads' Python (docs/performance.md).
# IN lists are padded to a power of two (repeating a key changes no answer),
# so that a handful of statements serve every batch from the statement cache.
_MAX_IN = 512


# Primary result codes, https://sqlite.org/rescode.html
_SQLITE_ERROR, _SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY = 1, 5, 6, 8
_SQLITE_IOERR, _SQLITE_CORRUPT, _SQLITE_FULL = 10, 11, 13
_SQLITE_CANTOPEN, _SQLITE_NOTADB = 14, 26


def storage_error(exc: sqlite3.Error, writing: bool = True) -> StorageError:
    """Return the StorageError that stands for an sqlite3 exception.

    Only a write's message says that nothing of it was stored.
    """
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    stored = NOTHING_STORED if writing else ""
    if code == _SQLITE_FULL:
        return StorageFull(f"the disk is full{stored}; free space and retry")
    if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return StorageBusy(f"the database is locked by another process{stored}; retry")
    if code == _SQLITE_READONLY:
        return StorageUnavailable(f"the database is read-only{stored}")
    if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return StorageUnavailable("the database file is damaged: restore it from a backup")
    if code in (_SQLITE_IOERR, _SQLITE_CANTOPEN):
        return StorageUnavailable(f"the database had an I/O error{stored}; retry")
    return StorageUnavailable(
        f"the database failed: {str(exc).splitlines()[0] if str(exc) else code}"
    )


@contextmanager
def translated(writing: bool = True) -> Iterator[None]:
    """Turn sqlite3 errors raised inside the block into StorageError."""
    try:
        yield
    except (sqlite3.OperationalError, sqlite3.DatabaseError) as exc:
        if isinstance(exc, sqlite3.ProgrammingError):
            raise
        raise storage_error(exc, writing) from exc


class SQLiteStore:
    """The key-value store in one SQLite file (a kvapp.store.base.Store)."""

    def __init__(
        self,
        path: str,
        busy_timeout_ms: int = 5000,
        synchronous: str = "FULL",
        startup_check_max_bytes: int = 256 * 1024 * 1024,
        clock: Callable[[], float] = time.time,
        read_cache_bytes: int = READ_CACHE_BYTES,
    ) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self.synchronous = synchronous
        self._clock = clock
        # Called after every commit of apply_batch with the number of Writes it held.
        self.on_commit: Callable[[int], None] = lambda size: None
        self._local = threading.local()
        # Every open connection, with the thread whose reads it serves (None:
        # the writer, which _write_lock guards).
        self._connections: dict[sqlite3.Connection, threading.Thread | None] = {}
        self._connections_lock = threading.Lock()
        self._closed = False
        self._write_lock = threading.Lock()
        self._open(startup_check_max_bytes)
        self._identity = _identity(path)
        try:
            self._generations = Generations(generations_path(path), busy_timeout_ms / 1000)
        except GenerationsUnavailable as exc:
            raise self._refuse(str(exc), exc.advice) from None
        self._cache = ReadCache(self._generations, read_cache_bytes)
        self._writer = self._connect(None)
        self._group_commit = GroupCommit(
            self.apply_batch,
            stalled_after=busy_timeout_ms / 1000 + STALLED_BEYOND_BUSY,
            stalled=lambda age, in_batch: gave_up(STALLED_FOR.format(age), in_batch),
        )
        self._seen_commits = self._generations.commits()
        self.feed = Feed(self._listen, self.revision)

    # -- connections -------------------------------------------------------

    def _connect(self, owner: threading.Thread | None) -> sqlite3.Connection:
        if self._closed:
            raise StorageUnavailable(CLOSED)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves.
        # check_same_thread=False: close() runs on another thread; each
        # connection is still used by one thread at a time.
        # mode=rw: after startup a missing file is an error, never a new empty
        # database that would answer 404 for every key
        # (https://sqlite.org/uri.html#urimode).  A write-protected file still
        # opens, read-only.
        conn = sqlite3.connect(
            f"file:{urllib.parse.quote(self.path)}?mode=rw",
            uri=True,
            isolation_level=None,
            check_same_thread=False,
            cached_statements=64,
        )
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        with self._connections_lock:
            if self._closed:  # close() ran while this one opened
                conn.close()
                raise StorageUnavailable(CLOSED)
            self._connections[conn] = owner
        return conn

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """Translate a read's sqlite3 errors; name a moved or deleted file as the cause.

        A thread that opens the file after it was renamed or deleted gets
        SQLITE_CANTOPEN (mode=rw), and in WAL mode a reader can get an I/O
        error: "retry" would not help, putting the file back does.
        """
        try:
            with translated(writing=False):
                yield
        except StorageUnavailable:
            if _identity(self.path) != self._identity:
                raise StorageUnavailable(MOVED.format(stored="")) from None
            raise

    def _reader(self) -> sqlite3.Connection:
        """Return this thread's reading connection, opened on its first read.

        It is closed when its thread ends: granian's blocking threads, the
        tail's refresher and the feed's listener come and go, and each would
        otherwise leave a connection (two file descriptors) behind.
        """
        held = getattr(self._local, "held", None)
        if self._closed:
            if held is not None:
                del self._local.held  # its finalizer closes the connection, in this thread
            raise StorageUnavailable(CLOSED)
        if held is None:
            with self._reading():
                conn = self._connect(threading.current_thread())
                held = _Held(conn)  # from here on, it closes conn when it goes
                lock, connections = self._connections_lock, self._connections
                weakref.finalize(held, _forget, lock, connections, conn).atexit = False
                conn.execute(f"PRAGMA cache_size = -{READER_PAGE_CACHE_KIB}")
            self._local.held = held
        return held.conn

    def close(self) -> None:
        """Close the connections no other thread is using; later calls raise StorageUnavailable.

        A connection closed while another thread is inside SQLite with it
        crashes the process (a segmentation fault, measured), so a reading
        connection of another thread that is still alive (a request that
        outlived the server's stop) is left to that thread: its next read
        closes it, and so does its end.  The writer is closed once the commit
        under way, if any, is done (_write_lock).
        """
        self.feed.close()  # first: its listener reads the store
        self._group_commit.close()
        with self._connections_lock:
            self._closed = True
            connections = dict(self._connections)
        me = threading.current_thread()
        for conn, owner in connections.items():
            if owner is None:
                if not self._write_lock.acquire(timeout=self.busy_timeout_ms / 1000):
                    continue  # a commit that hangs: the process's exit closes it
                try:
                    conn.close()
                finally:
                    self._write_lock.release()
            elif owner is me or not owner.is_alive():
                conn.close()
            else:
                continue
            with self._connections_lock:
                self._connections.pop(conn, None)
        self._cache.clear()
        self._generations.close()

    # -- startup -----------------------------------------------------------

    def _refuse(self, problem: str, advice: str) -> DatabaseUnusable:
        return DatabaseUnusable(f"cannot use database {self.path}: {problem}; {advice}")

    def _open(self, startup_check_max_bytes: int) -> None:
        """Create or check the file and its schema; raise DatabaseUnusable if it is unfit."""
        path = Path(self.path)
        try:
            make_folders(path.parent)
        except OSError as exc:
            raise self._refuse(
                f"cannot create its folder ({exc.strerror})", "check the path and permissions"
            ) from None
        existed = path.exists() and path.stat().st_size > 0
        if existed:
            self._check_header(path)
        self._check_writable(path)
        try:
            conn = sqlite3.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._refuse(
                f"cannot open it ({exc})", "check the path and permissions"
            ) from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            if existed and path.stat().st_size <= startup_check_max_bytes:
                rows = conn.execute("PRAGMA quick_check").fetchall()
                if rows != [("ok",)]:
                    raise self._refuse(
                        "it is damaged (PRAGMA quick_check failed)", "restore it from a backup"
                    )
            # Check before switching to WAL: refusing a file must not change it.
            version = self._check_schema(conn)
            mode = self._switch_to_wal(conn)
            if mode != "wal":
                raise self._refuse(f"it cannot use WAL mode (got {mode})", "check the filesystem")
            if version == SCHEMA_VERSION and _has_indexes(conn):
                # Nothing to create: no write lock, so a worker starting while
                # another process writes for longer than busy_timeout_ms (a
                # restart after a crash, a long import) starts all the same.
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Again under the write lock: another process may have created it meanwhile.
                version = self._check_schema(conn)
                for statement in SCHEMA if version is None else UPGRADES.get(version, ()):
                    conn.execute(statement)
                for statement in INDEXES:
                    conn.execute(statement)
                conn.execute("COMMIT")
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
            if code in (_SQLITE_READONLY, _SQLITE_CANTOPEN) and not os.access(path.parent, os.W_OK):
                # Reading a WAL database needs its -shm and -wal files, which
                # SQLite creates beside it (https://sqlite.org/wal.html#readonly).
                raise self._refuse(
                    f"its folder {path.parent} is read-only and SQLite must create"
                    f" {path.name}-wal and {path.name}-shm there",
                    "make the folder writable",
                ) from None
            raise self._refuse(_describe(exc), _advice(exc)) from None
        finally:
            conn.close()
        if not existed:
            _fsync_dir(path.parent)

    def _switch_to_wal(self, conn: sqlite3.Connection) -> str:
        """Set journal_mode=WAL, waiting up to busy_timeout for another process.

        Changing the journal mode needs an exclusive lock, and SQLite returns
        SQLITE_BUSY at once, without calling the busy handler, while another
        connection holds a write lock: waiting could deadlock
        (https://sqlite.org/c3ref/busy_handler.html).  Two workers creating a
        new database together met this in 2 of 1,000 starts, so retry here.
        """
        deadline = time.monotonic() + self.busy_timeout_ms / 1000
        while True:
            try:
                return cast(str, conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            except sqlite3.OperationalError as exc:
                code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
                if code != _SQLITE_BUSY or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    def _check_writable(self, path: Path) -> None:
        """Refuse a read-only database before SQLite opens it.

        SQLite would open it read-only and create its -shm file with the
        database's mode; that read-only -shm keeps the database read-only even
        after the file is made writable, and an open connection never becomes
        writable again.  So kvapp does not start read-only.
        """
        if os.statvfs(path.parent).f_flag & os.ST_RDONLY:
            raise self._refuse(
                f"its folder {path.parent} is on a read-only filesystem",
                "remount it read-write or choose another database path",
            )
        gen = Path(generations_path(str(path)))
        for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), gen):
            if _read_only(name):
                problem = "it is read-only" if name == path else f"{name} is read-only"
                raise self._refuse(problem, "make it writable for the user running kvapp")

    def _check_schema(self, conn: sqlite3.Connection) -> int | None:
        """Return the schema version, None if there are no tables yet; raise unless they are ours.

        A version this kvapp knows how to upgrade (UPGRADES) is fine.
        """
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        if not tables:
            return None
        foreign = self._refuse(
            "it holds tables that kvapp did not create", "choose another database path"
        )
        if not {"kv", "meta"} <= tables:
            raise foreign
        try:
            version = conn.execute(
                "SELECT value FROM meta WHERE name = 'schema_version'"
            ).fetchone()
        except sqlite3.OperationalError as exc:
            # SQLITE_ERROR here is "no such column": a meta table of another shape.
            if (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF != _SQLITE_ERROR:
                raise
            raise foreign from None
        if version is None or (version[0] != SCHEMA_VERSION and version[0] not in UPGRADES):
            raise self._refuse(
                f"its schema version is {version and version[0]},"
                f" this kvapp knows {SCHEMA_VERSION}",
                "use a matching kvapp version",
            )
        return int(version[0])

    def _check_header(self, path: Path) -> None:
        try:
            with open(path, "rb") as handle:
                header = handle.read(100)
        except OSError as exc:
            raise self._refuse(f"cannot read it ({exc.strerror})", "check permissions") from None
        if not header.startswith(SQLITE_MAGIC):
            raise self._refuse("it is not an SQLite database", "move it away or restore a backup")
        if len(header) < 100:
            raise self._refuse("its header is truncated", "restore it from a backup")
        page_size = int.from_bytes(header[16:18], "big")
        page_size = 65536 if page_size == 1 else page_size
        if page_size < 512 or page_size & (page_size - 1):
            raise self._refuse("its header is damaged", "restore it from a backup")
        size = path.stat().st_size
        if size % page_size:
            raise self._refuse(
                "it is truncated (not a whole number of pages)", "restore it from a backup"
            )
        # The header's page count is valid when its change counter matches
        # "version-valid-for" (https://sqlite.org/fileformat.html#in_header_database_size).
        pages = int.from_bytes(header[28:32], "big")
        if header[24:28] == header[92:96] and pages and size < pages * page_size:
            wal = Path(f"{path}-wal")
            if not (wal.exists() and wal.stat().st_size > 0):
                raise self._refuse(
                    f"it is truncated ({size} bytes, its header says {pages * page_size})",
                    "restore it from a backup",
                )

    # -- reads and writes ---------------------------------------------------

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def get(self, key: str) -> Item | None:
        """Return the live item stored under key, or None."""
        if self._closed:  # close() unmapped the cache's shared memory
            raise StorageUnavailable(CLOSED)
        now = int(self._clock() * 1000)
        cached = self._cache.lookup(key, now)
        if cached is not MISS:
            return cast(Item | None, cached)
        slot, generation = self._cache.before_query(key)
        with self._reading():
            row = (
                self._reader()
                .execute(
                    "SELECT value, content_type, revision, expires_at FROM kv WHERE key = ?",
                    (key,),
                )
                .fetchone()
            )
        if row is None:
            self._cache.store(key, None, None, slot, generation)
            return None
        item = Item(row[0], row[1], row[2])
        expires_at = row[3]
        self._cache.store(key, item, expires_at, slot, generation)
        return item if expires_at is None or expires_at > now else None

    def list_keys(self, prefix: str, after: str | None, limit: int) -> Listing:
        """Return up to limit live keys that start with prefix and sort above after.

        Keys come in UTF-8 byte order (the BINARY collation), from one range
        scan of the primary key's index: key >= prefix AND key < successor(prefix).
        The revision and the keys come from one read transaction: in WAL mode
        it reads one snapshot, taken at its first SELECT
        (https://sqlite.org/wal.html#concurrency).
        """
        operator, lower, upper = key_range(prefix, after)
        where, params = f"key {operator} ?", [lower]
        if upper is not None:
            where += " AND key < ?"
            params.append(upper)
        sql = (
            f"SELECT key FROM kv WHERE {where} AND (expires_at IS NULL OR expires_at > ?)"
            " ORDER BY key LIMIT ?"
        )
        with self._reading():
            conn = self._reader()
            conn.execute("BEGIN")
            try:
                revision = conn.execute(
                    "SELECT value FROM meta WHERE name = 'revision'"
                ).fetchone()[0]
                rows = conn.execute(sql, (*params, self._now_ms(), limit)).fetchall()
            finally:
                conn.execute("COMMIT")  # only reads: ends the snapshot
        return Listing(revision, [row[0] for row in rows])

    def stats(self) -> tuple[int, int]:
        """Return (number of live keys, bytes of the database file plus its WAL)."""
        with self._reading():
            keys = (
                self._reader()
                .execute(
                    "SELECT (SELECT count(*) FROM kv)"
                    " - (SELECT count(*) FROM kv WHERE expires_at <= ?)",
                    (self._now_ms(),),
                )
                .fetchone()[0]
            )
        size = 0
        for name in (self.path, f"{self.path}-wal"):
            try:
                size += os.stat(name).st_size
            except FileNotFoundError:
                pass
        return keys, size

    def check_health(self) -> None:
        """Return if the database answers a read and would accept a write; else raise StorageError.

        Writes nothing to disk.  BEGIN IMMEDIATE alone succeeds on a read-only
        file in WAL mode, so a no-op UPDATE asks for the write; its page stays
        in the cache and is rolled back, so the WAL does not grow per probe.
        A full disk only shows at commit, hence the free-space check.  While
        a commit waits for the disk, it fails at once.
        """
        if self._group_commit.stalled_now():
            raise StorageUnavailable(STALLED_FOR.format(self._group_commit.stalled_for()))
        with self._reading():
            self._reader().execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
        with self._transaction(commit=False, writing=False) as conn:
            conn.execute("UPDATE meta SET value = value WHERE name = 'revision'")
        try:
            fs = os.statvfs(Path(self.path).parent)
        except OSError as exc:
            raise StorageUnavailable(f"the database folder is unreadable: {exc.strerror}") from None
        free = fs.f_bavail * fs.f_frsize
        if free < HEALTH_MIN_FREE_BYTES:
            raise StorageFull(f"the disk is full: {free} bytes free; free space and retry")

    @contextmanager
    def _transaction(
        self, commit: bool = True, writing: bool = True
    ) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT on the writer connection, ROLLBACK on any error.

        IMMEDIATE takes the write lock up front, so a transaction that reads and
        then writes cannot fail half-way with SQLITE_BUSY_SNAPSHOT.  With
        commit=False it always ends in ROLLBACK.  writing=False: no client's
        write is at stake (the health probe), so no error says that nothing
        of one was stored.
        """
        if self._closed:  # close() unmapped the -gen file that writers lock
            raise StorageUnavailable(CLOSED)
        stored = NOTHING_STORED if writing else ""
        timeout = self.busy_timeout_ms / 1000
        if not self._write_lock.acquire(timeout=timeout):
            raise StorageBusy(f"the database is busy{stored}; retry")
        try:
            if self._closed:  # again: close() may have closed the writer meanwhile
                raise StorageUnavailable(CLOSED)
            conn = self._writer
            with self._writing(stored), translated(writing):
                conn.execute("BEGIN IMMEDIATE")
                try:
                    # In WAL mode SQLite keeps committing after its file was
                    # renamed or deleted, into a WAL that a restart would not
                    # match with the file: refuse instead of acknowledging.
                    if _identity(self.path) != self._identity:
                        raise StorageUnavailable(MOVED.format(stored=stored))
                    yield conn
                    if commit:
                        conn.execute("COMMIT")
                finally:
                    # After an error SQLite may already have rolled back
                    # (SQLITE_FULL, SQLITE_IOERR), so only roll back what is open.
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
        finally:
            self._write_lock.release()

    @contextmanager
    def _writing(self, stored: str = NOTHING_STORED) -> Iterator[None]:
        """Hold the writers' lock on the generation counters; see kvapp.store.readcache."""
        try:
            with self._generations.writing():
                yield
        except LockTimeout:
            raise StorageBusy(f"the database is busy{stored}; retry") from None

    def set_many(self, items: list[tuple[str, bytes, str]]) -> int:
        """Store (key, value, content_type) items in one transaction; return its revision."""
        write = Write(tuple(Put(key, value, content_type) for key, value, content_type in items))
        return self.apply(write).revision

    def apply(self, write: Write) -> Outcome:
        """Apply one Write, all or nothing; return its Outcome once it is durable.

        It shares a transaction with the writes of other threads (group
        commit).  Raises ConditionFailed, or the StorageError that failed
        its batch.
        """
        return self._group_commit.submit(write)

    def apply_batch(self, writes: Sequence[Write]) -> list[Result]:
        """Apply writes in one transaction and one commit; return each one's Result, in order.

        The rules are kvapp.store.plan's; here they cost one lookup (with the
        revision), one upsert and one delete statement for the whole batch
        (up to 512 keys each).  A StorageError fails the whole batch, and
        then nothing of it is stored.
        """
        with self._transaction() as conn:
            keys = list(dict.fromkeys(key for write in writes for key in write.keys()))
            start, rows = _read(conn, keys)
            reads = list(dict.fromkeys(key for write in writes for key in write.read_keys()))
            sizes = dict(_columns_of(conn, "length(value)", reads)) if reads else None
            now = self._now_ms()
            planned = plan(rows, writes, start, now, sizes)
            # Before the batch's rows are written: a read answers the value before it.
            results = planned.results
            if planned.fetch:
                found = _columns_of(conn, "value, content_type", planned.fetch_keys())
                results = planned.filled({key: (bytes(v), ct) for key, v, ct in found})
            if planned.revision != start:
                if planned.puts:
                    _upsert(conn, list(planned.puts.values()))
                if planned.deletes:
                    _delete(conn, planned.deletes)
                _log(conn, planned.events, now)
                conn.execute(
                    "UPDATE meta SET value = ? WHERE name = 'revision'", (planned.revision,)
                )
                # Last before COMMIT: readers stop trusting cached values of these keys.
                self._generations.begin([*planned.puts, *planned.deletes])
                self._generations.committing()
        self.on_commit(len(writes))
        if planned.revision != start:
            self.feed.notify()
        return results

    def purge_expired(self, limit: int = 500) -> int:
        """Delete up to limit expired rows in one short transaction; return how many.

        They take one revision, and each is an EXPIRED event of it.  No read
        cache slot changes: no reader can see an expired row.
        """
        with self._transaction() as conn:
            now = self._now_ms()
            keys = [
                row[0]
                for row in conn.execute(
                    "SELECT key FROM kv WHERE expires_at <= ? ORDER BY expires_at, key LIMIT ?",
                    (now, limit),
                )
            ]
            if not keys:
                return 0
            revision = conn.execute(
                "UPDATE meta SET value = value + 1 WHERE name = 'revision' RETURNING value"
            ).fetchone()[0]
            _delete(conn, keys)
            _log(conn, [Event(revision, n, key, EXPIRED) for n, key in enumerate(keys)], now)
            self._generations.committing()
        self.feed.notify()
        return len(keys)

    # -- the change log (kvapp.store.base; watchers in kvapp.web.watch) -------

    def history(
        self, after: tuple[int, int], prefix: str, limit: int, max_bytes: int = PAGE_BYTES
    ) -> History:
        """Return up to limit Events after the position after whose keys start with prefix.

        From one read transaction, so the revision and floor match the events
        (https://sqlite.org/wal.html#concurrency); a range scan of the
        primary key (revision, n) from the position.  Rows are stepped one by
        one, so none past max_bytes of values is read.
        """
        revision, n = after
        where, params = "", []
        if prefix:
            operator, lower, upper = key_range(prefix, None)
            where, params = f" AND key {operator} ?", [lower]
            if upper is not None:
                where += " AND key < ?"
                params.append(upper)
        sql = (
            "SELECT revision, n, key, kind, value, content_type, expires_at FROM changes"
            f" WHERE revision >= ? AND (revision > ? OR n > ?) AND revision <= ?{where}"
            " ORDER BY revision, n LIMIT ?"
        )
        with self._reading():
            conn = self._reader()
            conn.execute("BEGIN")
            try:
                meta = dict(
                    conn.execute(
                        "SELECT name, value FROM meta WHERE name IN ('revision', 'history_floor')"
                    ).fetchall()
                )
                cursor = conn.execute(
                    sql, (revision, revision, n, meta["revision"], *params, limit)
                )
                events, cut = _page(cursor, max_bytes)
                cut = cut or bool(limit) and len(events) == limit
                cursor.close()  # ends the statement before the snapshot
            finally:
                conn.execute("COMMIT")  # only reads: ends the snapshot
        return History(meta["revision"], meta["history_floor"], events, cut)

    def trim_history(self, max_age_seconds: int, keep: int, limit: int = 500) -> int:
        """Remove the oldest revisions' events: past max_age_seconds, or past the newest keep."""
        with self._transaction() as conn:
            beyond = conn.execute(
                "SELECT revision FROM changes ORDER BY revision DESC, n DESC LIMIT 1 OFFSET ?",
                (keep,),
            ).fetchone()
            oldest = conn.execute(
                "SELECT revision, committed_at FROM changes ORDER BY revision, n LIMIT ?",
                (limit + 1,),
            ).fetchall()
            before_ms = self._now_ms() - max_age_seconds * 1000
            cut = history_cut(oldest, before_ms, None if beyond is None else beyond[0], limit)
            if cut is None:
                return 0
            removed = conn.execute("DELETE FROM changes WHERE revision <= ?", (cut,)).rowcount
            conn.execute(
                "UPDATE meta SET value = max(value, ?) WHERE name = 'history_floor'", (cut,)
            )
        return int(removed)

    def revision(self) -> int:
        """Return the store's revision, read now."""
        with self._reading():
            row = self._reader().execute("SELECT value FROM meta WHERE name = 'revision'")
            return int(row.fetchone()[0])

    def _listen(self, timeout: float) -> bool:
        """Return True once the -gen file's commit counter moves, False after timeout seconds.

        Only the feed's listener calls this.  A read of shared memory: no
        system call, no SQLite call, while nothing changes.
        """
        deadline = time.monotonic() + timeout
        while True:
            commits = self._generations.commits()
            if commits != self._seen_commits:
                self._seen_commits = commits
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(LISTEN_POLL_SECONDS)

    # -- the data tools' interface (kvapp.tools.transfer) -

    def dump(self, after: str | None, limit: int) -> list[Record]:
        """Return up to limit live records whose keys sort above after, in UTF-8 byte order."""
        where, params = ("key > ? AND ", [after]) if after is not None else ("", [])
        sql = (
            "SELECT key, value, content_type, revision, expires_at FROM kv"
            f" WHERE {where}(expires_at IS NULL OR expires_at > ?) ORDER BY key LIMIT ?"
        )
        with self._reading():
            rows = self._reader().execute(sql, (*params, self._now_ms(), limit)).fetchall()
        return [Record(*row) for row in rows]

    def reserve(self, count: int) -> int:
        """Take the next count revisions for a load; return the revision before them."""
        with self._transaction() as conn:
            before = int(
                conn.execute(
                    "UPDATE meta SET value = value + ? WHERE name = 'revision' RETURNING value - ?",
                    (count, count),
                ).fetchone()[0]
            )
            conn.execute(_FLOOR_TO_REVISION)
            self._generations.committing()
        self.feed.notify()
        return before

    def load(self, records: list[Record]) -> None:
        """Insert or replace records, revisions included, in one transaction.

        A record equal to its stored row keeps that row, and its ETag, as it is.

        The store's revision counter is raised to the highest revision loaded,
        so a later write never reuses a revision (an ETag) that a loaded key
        already carries, and by one at least: the load is a change no watcher
        sees, so the history floor must pass every position a watcher holds
        (a load of older revisions would otherwise leave it at one that
        watchers caught up with, and they would resume past the load unaware).
        """
        if not records:
            return
        with self._transaction() as conn:
            conn.executemany(_LOAD, records)
            conn.execute(
                "UPDATE meta SET value = max(value + 1, ?) WHERE name = 'revision'",
                (max(record.revision for record in records),),
            )
            conn.execute(_FLOOR_TO_REVISION)
            self._generations.begin(record.key for record in records)
            self._generations.committing()
        self.feed.notify()

    def load_bulk(self, items: Iterable[tuple[str, bytes, str]], batch_size: int = 200_000) -> int:
        """Store many (key, value, content_type) items fast; return how many.

        For filling a database (the benchmark's 10M keys), not for serving:
        large transactions, executemany, and synchronous=OFF on a connection of
        its own, so no commit waits for the disk.  A crash mid-load can lose or
        damage the load, never earlier data
        (https://sqlite.org/pragma.html#pragma_synchronous).  At the end one
        FULL checkpoint makes everything durable; the serving connections
        keep their own synchronous setting throughout.
        """
        items = iter(items)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        count = 0
        try:
            with translated():
                conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
                conn.execute("PRAGMA synchronous = OFF")
                conn.execute("PRAGMA cache_size = -262144")  # 256 MiB for the key index
                batch = list(itertools.islice(items, batch_size))
                while batch:
                    # Every process's read cache forgets everything (kvapp.store.readcache).
                    with self._write_lock, self._writing():
                        conn.execute("BEGIN IMMEDIATE")
                        try:
                            revision = conn.execute(
                                "UPDATE meta SET value = value + 1 WHERE name = 'revision'"
                                " RETURNING value"
                            ).fetchone()[0]
                            conn.executemany(
                                _UPSERT,
                                [
                                    (key, value, ctype, revision, None)
                                    for key, value, ctype in batch
                                ],
                            )
                            conn.execute(_FLOOR_TO_REVISION)
                            self._generations.begin_all()
                            self._generations.committing()
                            conn.execute("COMMIT")
                        finally:
                            if conn.in_transaction:
                                conn.execute("ROLLBACK")
                    count += len(batch)
                    batch = list(itertools.islice(items, batch_size))
                conn.execute(f"PRAGMA synchronous = {self.synchronous}")
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
        return count


_UPSERT = (
    "INSERT INTO kv (key, value, content_type, revision, expires_at) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value,"
    " content_type = excluded.content_type, revision = excluded.revision,"
    " expires_at = excluded.expires_at"
)


_UPSERT_ROWS = _UPSERT.replace("VALUES (?, ?, ?, ?, ?)", "VALUES {rows}")
# A load leaves a row equal to its record alone: importing a file again, or
# finishing a failed --merge, changes no ETag of a value it did not change.
_LOAD = (
    _UPSERT + " WHERE (kv.value, kv.content_type, kv.expires_at)"
    " IS NOT (excluded.value, excluded.content_type, excluded.expires_at)"
)

_LOG_ROWS = (
    "INSERT INTO changes (revision, n, key, kind, value, content_type, expires_at, committed_at)"
    " VALUES {rows}"
)

# A load is not in the change log: watchers from before it must list again.
_FLOOR_TO_REVISION = (
    "UPDATE meta SET value = (SELECT value FROM meta WHERE name = 'revision')"
    " WHERE name = 'history_floor'"
)


def _has_indexes(conn: sqlite3.Connection) -> bool:
    """Return True if every index of INDEXES is in the database."""
    names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    return all(statement.split()[5] in names for statement in INDEXES)


def _page(rows: Iterable[Any], max_bytes: int) -> tuple[list[Event], bool]:
    """Return the Events of rows up to the one whose value takes them to max_bytes, and if cut."""
    events = []
    size = 0
    for row in rows:
        events.append(Event(*row))
        size += len(row[4] or b"")
        if size >= max_bytes:
            return events, True
    return events, False


class _Held:
    """A thread's reading connection: when the thread ends, so does this, and _forget runs."""

    __slots__ = ("conn", "__weakref__")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn


def _forget(lock: threading.Lock, connections: dict[Any, Any], conn: Any) -> None:
    """Close the reading connection of a thread that ended, and stop counting it."""
    with lock:
        connections.pop(conn, None)
    conn.close()


def _log(conn: sqlite3.Connection, events: list[Event], now: int) -> None:
    """Append events to the change log, _MAX_IN rows per INSERT."""
    for start in range(0, len(events), _MAX_IN):
        chunk = events[start : start + _MAX_IN]
        sql = _LOG_ROWS.format(rows=", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * len(chunk)))
        conn.execute(sql, [field for event in chunk for field in (*event, now)])


def _padded(keys: list[str]) -> tuple[list[str], str]:
    """Return keys padded to a power of two (repeating the last), and as many ?s for IN (...)."""
    size = 1 << (len(keys) - 1).bit_length()
    return keys + keys[-1:] * (size - len(keys)), ", ".join("?" * size)


def _read(
    conn: sqlite3.Connection, keys: list[str]
) -> tuple[int, dict[str, tuple[int, int | None]]]:
    """Return the store's revision, and (revision, expires_at) of the rows stored under keys.

    The revision comes with the first lookup, as the row whose key is NULL
    (no kv row has one): each statement is a GIL hand-off under load.
    """
    revision: int | None = None
    found: dict[str, tuple[int, int | None]] = {}
    chunks = [keys[start : start + _MAX_IN] for start in range(0, len(keys), _MAX_IN)]
    for index, chunk in enumerate(chunks or [[]]):
        selects: list[str] = []
        params: list[str] = []
        if chunk:
            params, marks = _padded(chunk)
            selects.append(f"SELECT key, revision, expires_at FROM kv WHERE key IN ({marks})")
        if index == 0:
            selects.append("SELECT NULL, value, NULL FROM meta WHERE name = 'revision'")
        for key, row_revision, expires_at in conn.execute(" UNION ALL ".join(selects), params):
            if key is None:
                revision = row_revision
            else:
                found[key] = (row_revision, expires_at)
    if revision is None:
        raise StorageUnavailable("the database has no revision row: it is not kvapp's")
    return revision, found


def _columns_of(conn: sqlite3.Connection, columns: str, keys: list[str]) -> Iterator[Any]:
    """Yield (key, *columns) of the rows stored under keys, for a transaction's reads.

    A read's size comes first, as length(value): for a BLOB SQLite reads it
    from the record header, without the value's overflow pages
    (https://sqlite.org/lang_corefunc.html#length).
    """
    for start in range(0, len(keys), _MAX_IN):
        chunk, marks = _padded(keys[start : start + _MAX_IN])
        yield from conn.execute(f"SELECT key, {columns} FROM kv WHERE key IN ({marks})", chunk)


def _upsert(conn: sqlite3.Connection, rows: list[NewRow]) -> None:
    """Write rows (keys unique) with one INSERT of up to _MAX_IN rows, not one step per row."""
    for start in range(0, len(rows), _MAX_IN):
        chunk = rows[start : start + _MAX_IN]
        sql = _UPSERT_ROWS.format(rows=", ".join(["(?, ?, ?, ?, ?)"] * len(chunk)))
        conn.execute(sql, [field for row in chunk for field in row])


def _delete(conn: sqlite3.Connection, keys: list[str]) -> None:
    for start in range(0, len(keys), _MAX_IN):
        chunk, marks = _padded(keys[start : start + _MAX_IN])
        conn.execute(f"DELETE FROM kv WHERE key IN ({marks})", chunk)


def _describe(exc: sqlite3.Error) -> str:
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    if code in (_SQLITE_NOTADB, _SQLITE_CORRUPT):
        return "it is not a healthy SQLite database"
    if code == _SQLITE_READONLY:
        return "it is read-only"
    return str(exc).splitlines()[0] if str(exc) else "SQLite error"


def _advice(exc: sqlite3.Error) -> str:
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    if code in (_SQLITE_NOTADB, _SQLITE_CORRUPT):
        return "move it away or restore a backup"
    if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return "another process holds it locked; retry"
    return "check the file, its folder and their permissions"


def _read_only(name: Path) -> bool:
    """Return True if name is a file that this process may not write.

    Another process's last connection removes the -wal and -shm files when it
    closes (https://sqlite.org/tempfiles.html#write_ahead_log_wal_files): one
    that is gone by the time it is asked about is not read-only.
    """
    if os.access(name, os.W_OK):
        return False
    return name.exists() and not os.access(name, os.W_OK)


def _identity(path: str) -> tuple[int, int] | None:
    """Return the (device, inode) of the file at path, or None if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def make_folders(folder: Path) -> None:
    """Create folder and its missing parents so that they survive a power cut.

    mkdir(2) changes the parent folder's entries in memory only.  A new entry
    is on disk once its folder is fsynced (fsync(2): "Calling fsync() does not
    necessarily ensure that the entry in the directory containing the file has
    also reached disk. For that an explicit fsync() on a file descriptor for the
    directory is also needed"), which is why SQLite's unix VFS fsyncs a folder
    after creating certain files in it, "to ensure that those files will still
    appear in the filesystem following a power loss or system crash"
    (https://sqlite.org/rescode.html#ioerr_dir_fsync).  That reaches the file's
    own folder only: without the same for each folder made here, a power cut
    could take a new database, and the writes acknowledged in it, away with the
    folders that held it.  So each missing folder is made, then the folder
    holding each new entry is fsynced, from the deepest up to the first folder
    that existed.  A folder that another process made meanwhile is fsynced too:
    no acknowledgement here may rest on that process's fsync.
    """
    missing = []
    while not folder.is_dir() and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    for created in reversed(missing):
        created.mkdir(exist_ok=True)
    for created in missing:
        _fsync_dir(created.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a newly created file's directory entry durable."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
