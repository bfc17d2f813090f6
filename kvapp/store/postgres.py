"""The key-value store in PostgreSQL: every line of its SQL, its connections and its errors.

Chosen when the database setting is a postgresql:// URL.  It keeps the
contract of kvapp.store.base (the same methods, Items, Outcomes and
StorageErrors) in SQL that CockroachDB and YugabyteDB accept too: two plain
tables, INSERT ... ON CONFLICT, BYTEA values, no extension, no procedure.
(The tests run it against PostgreSQL 15; the other two are kept in mind, not
tested.)

Durability: every session sets synchronous_commit = on, so COMMIT returns only
once the commit record is flushed to the server's WAL, and to its synchronous
standbys if it has any (https://www.postgresql.org/docs/current/runtime-config-wal.html
#GUC-SYNCHRONOUS-COMMIT).  synchronous = NORMAL turns it off: a server crash
may then lose the last writes, never half of one.

One writer at a time: every write transaction first locks the revision row of
meta (SELECT ... FOR UPDATE), the counterpart of SQLite's BEGIN IMMEDIATE.
Writers queue on that lock in order; the revision counter grows by one per
applied Write (ETags exactly as with SQLite); and since READ COMMITTED takes
a new snapshot for each statement, the reads that check a Write's conditions
see every commit made before the lock was granted, so among concurrent
conditional writers exactly one wins.  Under SERIALIZABLE or REPEATABLE READ
(CockroachDB's default) a transaction that lost the race gets SQLSTATE 40001
instead, and the whole batch runs again.  Group commit makes the one lock
cheap: one transaction carries the writes of many requests.  Readers never
wait for writers (MVCC).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from typing import Any, TypeVar

import psycopg
import psycopg.conninfo
from psycopg import errors
from psycopg.pq import TransactionStatus
from psycopg_pool import ConnectionPool, PoolTimeout

from kvapp.store.base import (
    CLOSED,
    EXPIRED,
    MAY_BE_STORED,
    NOTHING_STORED,
    PAGE_BYTES,
    DatabaseUnusable,
    Event,
    History,
    Item,
    Listing,
    Outcome,
    OutcomeUnknown,
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
from kvapp.store.location import redact
from kvapp.store.plan import history_cut, plan
from kvapp.store.watchdog import Guard, Watchdog

T = TypeVar("T")

SCHEMA_VERSION = 2

# The change log (kvapp.store.base), written in the transaction of each change.
CHANGES = """CREATE TABLE IF NOT EXISTS changes (
        revision     BIGINT NOT NULL,   -- the Write's revision
        n            INTEGER NOT NULL,  -- 0, 1, ... within the revision
        key          TEXT COLLATE "C" NOT NULL,
        kind         TEXT NOT NULL,     -- put, delete, expired
        value        BYTEA,             -- put only, as content_type and expires_at
        content_type TEXT,
        expires_at   BIGINT,
        committed_at BIGINT NOT NULL,   -- unix milliseconds, for watch_history_seconds
        PRIMARY KEY (revision, n)
    )"""

# Version 1 had no change log: its history starts at its current revision.
UPGRADE_FROM_1 = (
    CHANGES,
    "INSERT INTO meta (name, value) SELECT 'history_floor', value FROM meta"
    " WHERE name = 'revision' ON CONFLICT (name) DO NOTHING",
    f"UPDATE meta SET value = {SCHEMA_VERSION} WHERE name = 'schema_version'",
)

# The channel of LISTEN/NOTIFY: every write transaction notifies it, and the
# notification is delivered when (and only if) the transaction commits
# (https://www.postgresql.org/docs/current/sql-notify.html).
CHANNEL = "kvapp_changes"

# COLLATE "C" compares keys byte by byte, and the bytes are UTF-8 (the
# database's encoding is checked at start): listings come in UTF-8 byte order,
# as SQLite's BINARY collation gives them, whatever the database's locale.
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BIGINT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS kv (
        key          TEXT COLLATE "C" PRIMARY KEY,
        value        BYTEA NOT NULL,
        content_type TEXT NOT NULL,
        revision     BIGINT NOT NULL,  -- meta.revision of the last write
        expires_at   BIGINT            -- unix milliseconds, NULL: never
    )""",
    # Only rows with a TTL: the sweeper finds expired rows without a full scan.
    "CREATE INDEX IF NOT EXISTS kv_expires_at ON kv (expires_at) WHERE expires_at IS NOT NULL",
    CHANGES,
    "INSERT INTO meta (name, value) VALUES ('schema_version', %s), ('revision', 0),"
    " ('history_floor', 0) ON CONFLICT (name) DO NOTHING",
)
KV_COLUMNS = {"key", "value", "content_type", "revision", "expires_at"}

# A transaction that lost a race under SERIALIZABLE runs again this many times.
SERIALIZATION_RETRIES = 5

# A transaction that found its connection dead before COMMIT runs again on a
# new one this many times.  A server restart kills the pooled connections,
# and also those the pool was opening as it happened (the pool's min_size,
# 2, refilled in the background): under load the first new connection was
# one of those too, and the request answered 503.
RECONNECTS = 3

# Seconds a request waits for a pooled connection before 503.  The pool holds
# one per waitress thread and more, so a wait means the server cannot be
# reached: while it is down, requests answer 503 this fast instead of
# holding every thread for the busy timeout.
CONNECTION_WAIT = 1.0

# Seconds after which a batch that holds the write lock, or a server that
# answers nobody, counts as stalled: the writes behind and beside the batch
# stop waiting for it (kvapp.store.groupcommit), and new operations get this
# bound instead of timeout_seconds (kvapp.store.watchdog).  A healthy server
# answers a commit in milliseconds, also from a synchronous standby on the same
# network.  A batch that waits for the lock gets busy_timeout_ms more.
STALLED_AFTER = 1.0

# Seconds /healthz waits for the database's answers, and for the write lock.
HEALTH_TIMEOUT = 1.0
HEALTH_UNCONFIRMED = (
    "a test commit was not confirmed within {:g} s"
    " (the server does not answer, or its synchronous standby does not)"
)

_LOCK_REVISION = "SELECT value FROM meta WHERE name = 'revision' FOR UPDATE"
# Every row of a batch in one statement: one array per column, unnest() makes
# them rows again.  The keys must be distinct (ON CONFLICT cannot update a row
# twice in one statement); callers keep the last value of each key.
_UPSERT = (
    "INSERT INTO kv (key, value, content_type, revision, expires_at)"
    " SELECT * FROM unnest(%b::text[], %b::bytea[], %b::text[], %b::bigint[], %b::bigint[])"
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value,"
    " content_type = excluded.content_type, revision = excluded.revision,"
    " expires_at = excluded.expires_at"
)
# A load leaves a row equal to its record alone (see kvapp.store.sqlite._LOAD).
_LOAD = (
    _UPSERT + " WHERE (kv.value, kv.content_type, kv.expires_at)"
    " IS DISTINCT FROM (excluded.value, excluded.content_type, excluded.expires_at)"
)
_LOG = (
    "INSERT INTO changes (revision, n, key, kind, value, content_type, expires_at, committed_at)"
    " SELECT r, n, k, kind, v, t, e, %b FROM unnest(%b::bigint[], %b::int[], %b::text[],"
    " %b::text[], %b::bytea[], %b::text[], %b::bigint[]) AS u(r, n, k, kind, v, t, e)"
)
# A load is not in the change log: watchers from before it must list again.
_FLOOR_TO_REVISION = (
    "UPDATE meta SET value = (SELECT value FROM meta WHERE name = 'revision')"
    " WHERE name = 'history_floor'"
)


def _log(conn: psycopg.Connection, events: Sequence[Event], now: int) -> None:
    """Append events to the change log and notify the watchers' listeners, at COMMIT."""
    columns: list[list[Any]] = [[] for _ in Event._fields]
    for event in events:
        for column, value in zip(columns, event, strict=True):
            column.append(value)
    conn.execute(_LOG, (now, *columns))
    conn.execute(f"NOTIFY {CHANNEL}")


def _scalar(cursor: psycopg.Cursor[Any]) -> Any:
    """Return the first column of the one row a statement that always gives one row returned."""
    row = cursor.fetchone()
    if row is None:
        raise psycopg.ProgrammingError("the statement returned no row")
    return row[0]


def _columns(rows: Iterable[Sequence[Any]]) -> list[list[Any]]:
    """Return the five columns of kv rows, as the arrays _UPSERT takes."""
    columns: list[list[Any]] = [[], [], [], [], []]
    for row in rows:
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    return columns


# SQLSTATEs, https://www.postgresql.org/docs/current/errcodes-appendix.html
_DISK_FULL = "53100"
_BUSY = "55P03"  # lock_not_available (lock_timeout)
_CANCELED = "57014"  # query_canceled: statement_timeout, or pg_cancel_backend()
_CONFLICT = {"40001", "40P01"}  # serialization_failure, deadlock_detected
_READ_ONLY = "25006"
_GONE = {"57P01", "57P02", "57P03"}  # admin_shutdown, crash_shutdown, cannot_connect_now
# Mistakes in kvapp's own SQL: let them reach the catch-all (500, traceback logged).
_BUGS = {"42601", "42804", "42883", "42P18"}

# {stored}: NOTHING_STORED in a write's message; a read's says nothing of storing.
_UNREACHABLE = "the database server cannot be reached{stored}; retry"
UNREACHABLE = _UNREACHABLE.format(stored=NOTHING_STORED)
COMMIT_UNKNOWN = f"the connection to the database server was lost while committing: {MAY_BE_STORED}"
TIMED_OUT = "the database server did not answer within {seconds:g} s{stored}; retry"
COMMIT_UNANSWERED = "the database server did not answer the commit within {:g} s: " + MAY_BE_STORED
# PostgreSQL keeps a commit whose wait for its synchronous standbys is
# cancelled, and says so with a WARNING: the standby may lack it, and a
# failover may lose it (src/backend/replication/syncrep.c).
NOT_REPLICATED = (
    "the database server committed the write but gave up waiting for its synchronous"
    " standby: the write may or may not be stored after a failover; retry"
)
STALLED_FOR = "the database server has not answered a commit for {:.0f} s"


def _waited(guard: Guard, left: float, bound: float) -> float:
    """Return the wait a timed-out run reports: its request's bound, or the silent server's."""
    return bound if guard.seconds == left else guard.seconds


def storage_error(exc: psycopg.Error, writing: bool = True) -> StorageError:
    """Return the StorageError that stands for an error the server or libpq reported.

    Only a write's message says that nothing of it was stored.
    """
    state = exc.sqlstate or ""
    stored = NOTHING_STORED if writing else ""
    if state == _DISK_FULL:
        return StorageFull(f"the disk is full{stored}; free space and retry")
    if state == _BUSY:
        return StorageBusy(f"the database is locked by another process{stored}; retry")
    if state == _CANCELED:
        return StorageUnavailable(
            "the database server canceled the statement (statement_timeout, or an operator)"
            f"{stored}; retry"
        )
    if state in _CONFLICT:
        return StorageBusy(f"the database is busy with conflicting writes{stored}; retry")
    if state == _READ_ONLY:
        return StorageUnavailable(f"the database is read-only{stored}")
    if state.startswith("53"):
        return StorageUnavailable(
            f"the database server is out of resources (connections or memory){stored}; retry"
        )
    if (
        state.startswith("08")
        or state in _GONE
        or (not state and isinstance(exc, psycopg.OperationalError))
    ):
        return StorageUnavailable(_UNREACHABLE.format(stored=stored))
    first = str(exc).splitlines()[0] if str(exc) else state
    return StorageUnavailable(f"the database failed: {first}")


# psycopg.connect() (psycopg/connection.py, 3.3) when every address of the URL failed.
_MULTIPLE_ATTEMPTS = "Multiple connection attempts failed."


def connect_error(exc: psycopg.Error) -> str:
    """Return libpq's message of a failed connection as one line, each of its lines kept.

    libpq writes what failed on the first line and a hint on the next, indented
    with a tab ('connection to server at "h", port 1 failed: Connection
    refused\n\tIs the server running...'); psycopg puts 'connection failed: '
    in front.  Runs of whitespace become one space and lines are joined with '; '.
    When a URL's host has several addresses (localhost: ::1 and 127.0.0.1),
    psycopg adds every attempt's message after the last one's; those are
    counted, not repeated.
    """
    message, several, attempts = str(exc).partition(_MULTIPLE_ATTEMPTS)
    lines = [" ".join(line.split()) for line in message.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return type(exc).__name__
    if several:
        tried = sum(line.startswith("- ") for line in attempts.splitlines())
        lines.append(f"{tried} connection attempts failed")
    lines[0] = lines[0].removeprefix("connection failed: ")
    text = lines[0]
    for line in lines[1:]:
        text += (" " if text.endswith(":") else "; ") + line
    return text.replace("FATAL: ", "")


class _ConnectionLost(OutcomeUnknown):
    """The connection broke once COMMIT was sent (_transaction)."""


class PostgresStore:
    """The key-value store in one PostgreSQL database (a kvapp.store.base.Store), through a pool."""

    def __init__(
        self,
        url: str,
        busy_timeout_ms: int = 5000,
        synchronous: str = "FULL",
        pool_size: int = 8,
        clock: Callable[[], float] = time.time,
        timeout_seconds: float = 10.0,
    ) -> None:
        self.url = url
        self.path = redact(url)  # what messages and logs name
        self.busy_timeout_ms = busy_timeout_ms
        self.synchronous = synchronous
        self.pool_size = max(pool_size, 2)
        self.timeout_seconds = timeout_seconds
        self._clock = clock
        # Called after every commit of apply_batch with the number of Writes it held.
        self.on_commit: Callable[[int], None] = lambda size: None
        self._watchdog = Watchdog()
        self._batch_locked = False  # the batch being applied holds the revision lock
        self._probe_sent: float | None = None  # time.monotonic() of the last stall probe
        self._group_commit = GroupCommit(
            self.apply_batch,
            stalled_after=STALLED_AFTER,
            stalled=lambda age, in_batch: gave_up(STALLED_FOR.format(age), in_batch),
            is_stalled=self._batch_stalled,
        )
        self._kwargs = self._connection_kwargs()
        self._pool_lock = threading.Lock()
        self._pools: list[ConnectionPool] = []
        self._pool_pid = 0
        self._relation_size = True
        self._open()
        self._listener: psycopg.Connection | None = None
        self._listener_pid = 0
        self._closed = False
        self.feed = Feed(self._listen, self.revision, self._stop_listening)

    # -- connections -------------------------------------------------------

    def _connection_kwargs(self) -> dict[str, Any]:
        """Return what every connection adds to the URL's own parameters."""
        try:
            given = psycopg.conninfo.conninfo_to_dict(self.url)
        except psycopg.ProgrammingError:
            # libpq's message quotes the URL, or the part it could not read,
            # password included: it is not shown.
            raise self._refuse(
                "the URL is malformed",
                "check its host, port and %-escapes against"
                " https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-CONNSTRING-URIS",
            ) from None
        # Keys are text in UTF-8 both ways, whatever the URL or PGCLIENTENCODING says.
        kwargs: dict[str, Any] = {
            "autocommit": True,
            "client_encoding": "UTF8",
            "fallback_application_name": "kvapp",
            # No server-side prepared statements: psycopg can lose track of
            # them when a pipeline aborts (a 40001 mid-batch), and poolers
            # in transaction mode (PgBouncer) cannot carry them.
            "prepare_threshold": None,
        }
        if "connect_timeout" not in given:
            # libpq waits forever for an unreachable host by default.
            kwargs["connect_timeout"] = max(2, round(self.busy_timeout_ms / 1000))
        # A peer whose TCP stack stopped answering (a host gone, a partition
        # dropping packets): sent data unacknowledged for timeout_seconds ends
        # the connection (tcp_user_timeout, Linux), and so do 3 unanswered
        # keepalive probes 1 s apart after timeout_seconds / 2 of silence
        # (https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-KEEPALIVES).
        # kvapp.store.watchdog bounds what these cannot see.
        timeout = max(1, round(self.timeout_seconds))
        defaults = {
            "keepalives": 1,
            "keepalives_idle": max(1, timeout // 2),
            "keepalives_interval": 1,
            "keepalives_count": 3,
            "tcp_user_timeout": timeout * 1000,
        }
        kwargs.update({name: value for name, value in defaults.items() if name not in given})
        return kwargs

    def _configure(self, conn: psycopg.Connection) -> None:
        """Set what kvapp relies on in a new session, whatever the server's defaults."""
        guard = self._watchdog.guard(conn, self.timeout_seconds)
        try:
            with guard:
                self._settings(conn)
        finally:
            if guard.timed_out:
                conn.close()  # the pool discards it

    def _settings(self, conn: psycopg.Connection) -> None:
        if self.synchronous == "FULL":
            current = _scalar(conn.execute("SHOW synchronous_commit"))
            # remote_apply waits for more than on does: keep it.
            if current != "remote_apply":
                conn.execute("SET synchronous_commit = on")
        else:
            conn.execute("SET synchronous_commit = off")
        # The WARNING of a COMMIT whose wait for a synchronous standby was
        # cancelled must reach kvapp (_transaction), whatever the role says.
        conn.execute("SET client_min_messages = warning")
        # A write waits this long for the revision lock, then StorageBusy (503).
        conn.execute(f"SET lock_timeout = {int(self.busy_timeout_ms)}")
        # The server ends a statement it runs for longer than a request may
        # wait, also when kvapp is no longer there to cancel it.  It does not
        # cover COMMIT (kvapp.store.watchdog).
        conn.execute(f"SET statement_timeout = {int(self.timeout_seconds * 1000)}")
        # A kvapp process that stops mid-transaction (SIGSTOP, a frozen host)
        # must not hold the one write lock for ever: the server ends it.
        # A safety net only: a server without this setting still serves.
        idle = max(10_000, 4 * int(self.busy_timeout_ms))
        with suppress(errors.UndefinedObject, errors.FeatureNotSupported):
            conn.execute(f"SET idle_in_transaction_session_timeout = {idle}")

    def _pool(self) -> ConnectionPool:
        """Return this process's pool, opened on first use.

        A forked worker must not use its parent's sockets, nor close them (that
        would end the parent's sessions): it opens its own pool and leaves the
        inherited one alone.
        """
        pid = os.getpid()
        if self._pool_pid != pid:
            with self._pool_lock:
                if self._closed:  # a new pool would open sessions that nothing closes
                    raise StorageUnavailable(CLOSED)
                if self._pool_pid != pid:
                    pool = ConnectionPool(
                        self.url,
                        kwargs=self._kwargs,
                        min_size=2,
                        max_size=self.pool_size,
                        configure=self._configure,
                        timeout=CONNECTION_WAIT,
                        # Give up a reconnection after a few seconds: the next
                        # request that needs a connection starts a new one at
                        # once instead of waiting out a long backoff.
                        reconnect_timeout=5.0,
                        name="kvapp",
                        open=False,
                    )
                    pool.open(wait=False)
                    self._pools.append(pool)
                    self._pool_pid = pid
        return self._pools[-1]

    def close(self) -> None:
        """Close every connection this repository opened in this process; later calls fail."""
        self.feed.close()  # first: its listener reads the store
        self._group_commit.close()
        self._closed = True
        self._stop_listening()
        with self._pool_lock:
            if self._pool_pid == os.getpid() and self._pools:
                self._pools.pop().close()
            self._pool_pid = 0

    def _run(
        self,
        body: Callable[[psycopg.Connection], T],
        seconds: float | None = None,
        writing: bool = True,
    ) -> T:
        """Return body(conn) run on a pooled connection; raise StorageError for any failure.

        body gets seconds (default timeout_seconds) to end (kvapp.store.watchdog);
        past that it fails, with OutcomeUnknown if its COMMIT was sent, and
        the connection is closed.  When a pooled connection turns out dead
        before anything could be committed (the server restarted since it was
        pooled), the pool replaces its idle connections and body runs again on
        a new one, up to RECONNECTS times, unless the batch being written was
        given up as stalled (kvapp.store.groupcommit).  When a transaction
        loses a race under SERIALIZABLE (40001), body runs again, up to
        SERIALIZATION_RETRIES times.  All runs together get seconds.
        """
        bound = self.timeout_seconds if seconds is None else seconds
        stored = NOTHING_STORED if writing else ""
        reconnects = 0
        conflicts = 0
        # Runs again share the first one's bound: no request waits longer in all.
        deadline = time.monotonic() + bound
        while True:
            pool = self._pool()
            try:
                conn = pool.getconn()
            except PoolTimeout:
                raise StorageUnavailable(_UNREACHABLE.format(stored=stored)) from None
            left = bound if not (reconnects or conflicts) else deadline - time.monotonic()
            if left <= 0:
                pool.putconn(conn)
                raise StorageUnavailable(TIMED_OUT.format(seconds=bound, stored=stored))
            guard = self._watchdog.guard(conn, left, STALLED_AFTER)
            try:
                with guard:
                    try:
                        return body(conn)
                    except _ConnectionLost as exc:
                        if guard.timed_out:  # the watchdog cut it
                            raise OutcomeUnknown(
                                COMMIT_UNANSWERED.format(_waited(guard, left, bound))
                            ) from exc
                        raise
                    except psycopg.Error as exc:
                        if guard.timed_out:
                            raise StorageUnavailable(
                                TIMED_OUT.format(seconds=_waited(guard, left, bound), stored=stored)
                            ) from exc
                        if (
                            conn.broken
                            and reconnects < RECONNECTS
                            and not (writing and self._group_commit.stalled_now())
                        ):
                            # _transaction turned a break during COMMIT into a
                            # StorageError, so nothing of this one was committed.
                            # Not once the batch was given up: its other writes
                            # were answered "may or may not be stored", and a run
                            # again would commit it long after (when a partition
                            # heals).
                            reconnects += 1
                        elif exc.sqlstate in _CONFLICT and conflicts < SERIALIZATION_RETRIES:
                            conflicts += 1
                            time.sleep(random.uniform(0, 0.002 * 2**conflicts))
                            continue
                        elif isinstance(exc, psycopg.InterfaceError) or (
                            isinstance(exc, psycopg.ProgrammingError)
                            and (exc.sqlstate is None or exc.sqlstate in _BUGS)
                        ):
                            raise
                        else:
                            raise storage_error(exc, writing) from exc
            finally:
                # Read once the guard has ended: the watchdog cannot act on it after that.
                if guard.timed_out:
                    # A cancel sent late must not reach the connection's next user.
                    conn.close()
                # A broken or closed connection is dropped, and replaced, by the pool.
                pool.putconn(conn)
            # The server restarted since the connection was pooled, so the
            # others are dead too: replace them all.  (pool.check() would ask
            # each one, and wait for ever for a server that does not answer.)
            pool.drain()

    def _read(self, sql: str, params: Sequence[Any], binary: bool = False) -> list[tuple[Any, ...]]:
        """Return the rows of one query run outside any transaction."""

        return self._run(
            lambda conn: conn.execute(sql, params, binary=binary).fetchall(), writing=False
        )

    @contextmanager
    def _transaction(
        self, conn: psycopg.Connection, pipelined: bool = False
    ) -> Iterator[Callable[[], None]]:
        """BEGIN, yield the function that commits, ROLLBACK on any error or without a commit.

        pipelined: statements go out without waiting for each other's answers
        (libpq pipeline mode); a fetch waits for what was sent so far, and
        commit() waits for the rest before it sends COMMIT on its own.

        When the connection breaks before COMMIT is sent, the server rolls
        back what it had: nothing was stored, and _run may run the
        transaction again.  When it breaks once COMMIT was sent, the outcome
        is unknown, and StorageUnavailable says so.  That is why COMMIT is
        not pipelined with the changes: the unknown stays one round trip wide.
        """
        committing = False
        pipeline: psycopg.Pipeline | None = None
        warnings: list[str] = []

        def commit() -> None:
            nonlocal committing
            if pipeline is not None:
                pipeline.sync()  # every change answered: any error is raised here
            committing = True
            conn.add_notice_handler(notice)
            conn.execute("COMMIT")

        def notice(diagnostic: psycopg.errors.Diagnostic) -> None:
            if diagnostic.severity_nonlocalized == "WARNING":
                warnings.append(diagnostic.message_primary or "")

        try:
            with conn.pipeline() if pipelined else nullcontext() as pipeline:
                conn.execute("BEGIN")
                yield commit
        except psycopg.Error as exc:
            if committing and conn.broken:
                raise _ConnectionLost(COMMIT_UNKNOWN) from exc
            raise
        finally:
            if committing:
                conn.remove_notice_handler(notice)
            if conn.info.transaction_status != TransactionStatus.IDLE and not conn.broken:
                with suppress(psycopg.Error):
                    conn.execute("ROLLBACK")
        if warnings:
            # The only WARNING a COMMIT gives: a cancelled wait for a synchronous standby.
            raise OutcomeUnknown(NOT_REPLICATED)

    # -- startup -----------------------------------------------------------

    def _refuse(self, problem: str, advice: str) -> DatabaseUnusable:
        return DatabaseUnusable(f"cannot use database {redact(self.url)}: {problem}; {advice}")

    def _open(self) -> None:
        """Check the server and create or check the schema; raise DatabaseUnusable if unfit."""
        try:
            conn = psycopg.connect(self.url, **self._kwargs)
        except psycopg.Error as exc:
            raise self._refuse(
                f"cannot connect ({connect_error(exc)})",
                "check that the server runs and that the URL, user and password are right",
            ) from None
        guard = None
        try:
            with self._watchdog.guard(conn, self.timeout_seconds) as guard:
                self._settings(conn)  # under this guard, not _configure's own
                encoding = _scalar(conn.execute("SHOW server_encoding"))
                if encoding.upper().replace("-", "") != "UTF8":
                    raise self._refuse(
                        f"its encoding is {encoding}", "create the database with ENCODING 'UTF8'"
                    )
                if _scalar(conn.execute("SHOW transaction_read_only")) == "on":
                    raise self._refuse(
                        "it is read-only (a standby, or default_transaction_read_only)",
                        "point kvapp at the primary",
                    )
                for attempt in range(3):
                    try:
                        self._create_schema(conn)
                        break
                    except (errors.UniqueViolation, errors.DuplicateTable, errors.DuplicateObject):
                        # Another kvapp created the tables at the same moment.
                        if attempt == 2:
                            raise
        except (psycopg.Error, OutcomeUnknown) as exc:
            if guard is not None and guard.timed_out:
                problem = f"it did not answer within {guard.seconds:g} s"
            else:
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                problem = f"it failed ({first})"
            raise self._refuse(problem, "check the server and its log") from None
        finally:
            conn.close()

    def _create_schema(self, conn: psycopg.Connection) -> None:
        with self._transaction(conn) as commit:
            tables = {
                row[0]
                for row in conn.execute(
                    "SELECT table_name FROM information_schema.tables"
                    " WHERE table_schema = current_schema() AND table_name IN ('kv', 'meta')"
                )
            }
            if tables == {"kv"} or tables == {"meta"}:
                raise self._refuse(
                    f"it holds a table {tables.pop()} that kvapp did not create",
                    "choose another database",
                )
            if tables:
                columns = {
                    row[0]: row[1]
                    for row in conn.execute(
                        "SELECT column_name, collation_name FROM information_schema.columns"
                        " WHERE table_schema = current_schema() AND table_name = 'kv'"
                    )
                }
                if set(columns) != KV_COLUMNS or columns["key"] != "C":
                    raise self._refuse(
                        "it holds a table kv that kvapp did not create", "choose another database"
                    )
            if tables:
                version = conn.execute(
                    "SELECT value FROM meta WHERE name = 'schema_version'"
                ).fetchone()
                if version is not None and version[0] == 1:
                    for statement in UPGRADE_FROM_1:
                        conn.execute(statement)
            for statement in SCHEMA:
                if "%s" in statement:
                    conn.execute(statement, (SCHEMA_VERSION,))
                elif not tables or "INDEX" in statement or statement is CHANGES:
                    conn.execute(statement)
            row = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
            if row is None or row[0] != SCHEMA_VERSION:
                raise self._refuse(
                    f"its schema version is {row and row[0]}, this kvapp knows {SCHEMA_VERSION}",
                    "use a matching kvapp version",
                )
            commit()

    # -- reads -------------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def get(self, key: str) -> Item | None:
        """Return the live item stored under key, or None."""
        rows = self._read(
            "SELECT value, content_type, revision FROM kv"
            " WHERE key = %s AND (expires_at IS NULL OR expires_at > %s)",
            (key, self._now_ms()),
            binary=True,
        )
        return Item(bytes(rows[0][0]), rows[0][1], rows[0][2]) if rows else None

    def list_keys(self, prefix: str, after: str | None, limit: int) -> Listing:
        """Return up to limit live keys that start with prefix and sort above after.

        Keys come in UTF-8 byte order (COLLATE "C"), from one range scan of
        the primary key's index: key >= prefix AND key < successor(prefix).
        One statement reads the revision and the keys, so from one snapshot
        (https://www.postgresql.org/docs/current/transaction-iso.html#XACT-READ-COMMITTED).
        """
        operator, lower, upper = key_range(prefix, after)
        where, params = f"key {operator} %s", [lower]
        if upper is not None:
            where += " AND key < %s"
            params.append(upper)
        # One row: the revision, and the keys as an array in the subquery's order.
        sql = (
            "SELECT (SELECT value FROM meta WHERE name = 'revision'), ARRAY("
            f"SELECT key FROM kv WHERE {where} AND (expires_at IS NULL OR expires_at > %s)"
            " ORDER BY key LIMIT %s)"
        )
        ((revision, keys),) = self._read(sql, (*params, self._now_ms(), limit))
        return Listing(revision, list(keys))

    def stats(self) -> tuple[int, int]:
        """Return (number of live keys, bytes of the kv table with its indexes and TOAST)."""
        now = self._now_ms()
        keys = self._read(
            "SELECT count(*) FROM kv WHERE expires_at IS NULL OR expires_at > %s", (now,)
        )[0][0]
        size = 0
        if self._relation_size:
            try:
                size = self._read("SELECT pg_total_relation_size('kv')", ())[0][0]
            except errors.UndefinedFunction:
                # CockroachDB has no pg_total_relation_size: report 0 from then on.
                self._relation_size = False
        return keys, int(size)

    def check_health(self) -> None:
        """Return if the database answers a read and commits a write; else raise StorageError.

        The write probe updates the revision row to itself and commits: it
        waits for the write lock, and its commit for the synchronous
        standbys, as a write would (one WAL record per probe, no revision).
        Each wait is HEALTH_TIMEOUT at most, not timeout_seconds: a load
        balancer's probe must get its answer before it gives up.  While
        writes stall, it fails at once.
        """
        if self._group_commit.stalled_now():
            raise StorageUnavailable(STALLED_FOR.format(self._group_commit.stalled_for()))
        wait_ms = min(int(HEALTH_TIMEOUT * 1000), self.busy_timeout_ms)

        def probe(conn: psycopg.Connection) -> None:
            conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
            with self._transaction(conn) as commit:
                conn.execute(f"SET LOCAL lock_timeout = {wait_ms}")
                conn.execute("UPDATE meta SET value = value WHERE name = 'revision'")
                commit()

        try:
            self._run(probe, HEALTH_TIMEOUT, writing=False)  # stores nothing, by design
        except OutcomeUnknown:
            raise StorageUnavailable(HEALTH_UNCONFIRMED.format(HEALTH_TIMEOUT)) from None

    # -- writes ------------------------------------------------------------

    def set_many(self, items: list[tuple[str, bytes, str]]) -> int:
        """Store (key, value, content_type) items in one transaction; return its revision."""
        write = Write(tuple(Put(key, value, content_type) for key, value, content_type in items))
        return self.apply(write).revision

    def _batch_stalled(self, age: float) -> bool:
        """Return whether a batch applied for age (> STALLED_AFTER) seconds is stuck.

        Once the batch holds the revision lock, only the server's answer is
        missing: stuck.  Before, it may wait for the lock that another kvapp
        process or host holds, which is normal up to busy_timeout_ms
        (lock_timeout), or for a server that answers nobody.  A probe (a
        SELECT 1 on another connection) tells them apart: the batch is stuck
        once the probe has gone unanswered for STALLED_AFTER.
        """
        if self._batch_locked or age > self.busy_timeout_ms / 1000 + STALLED_AFTER:
            return True
        if self._watchdog.silent_for() <= STALLED_AFTER:
            return False  # the server answered something while the batch waited
        now = time.monotonic()
        sent = self._probe_sent
        if sent is None or now - sent > 2 * STALLED_AFTER:  # none yet for this wait
            self._probe_sent = now
            threading.Thread(target=self._probe, name="kvapp-db-probe", daemon=True).start()
            return False
        return now - sent >= STALLED_AFTER

    def _probe(self) -> None:
        with suppress(StorageError):
            self._read("SELECT 1", ())

    def apply(self, write: Write) -> Outcome:
        """Apply one Write, all or nothing; return its Outcome once it is durable.

        It shares a transaction with the writes of other threads (group
        commit, kvapp.store.groupcommit).  Raises ConditionFailed, or the StorageError
        that failed its batch.
        """
        return self._group_commit.submit(write)

    def apply_batch(self, writes: Sequence[Write]) -> list[Result]:
        """Apply writes in one transaction and one commit; return each one's Result, in order.

        The rules are kvapp.store.plan's.  A StorageError fails the whole
        batch, and then nothing of it is stored.  Two round trips, whatever
        the batch holds: BEGIN, the revision lock and every key's current
        version; then the upserts of the final values, the deletes, the new
        revision and COMMIT.
        """
        keys = list({key for write in writes for key in write.keys()})
        reads = list({key for write in writes for key in write.read_keys()})

        def batch(conn: psycopg.Connection) -> list[Result]:
            self._batch_locked = False
            with self._transaction(conn, pipelined=True) as commit:
                now = self._now_ms()
                lock = conn.execute(_LOCK_REVISION)
                current = conn.execute(
                    "SELECT key, revision, expires_at FROM kv WHERE key = ANY(%s)", (keys,)
                )
                # octet_length of a TOASTed value reads its size, not the value.
                stored = reads and conn.execute(
                    "SELECT key, octet_length(value) FROM kv WHERE key = ANY(%s)", (reads,)
                )
                start = _scalar(lock)  # the first round trip
                self._batch_locked = True
                rows = {key: (revision, expires) for key, revision, expires in current.fetchall()}
                sizes: dict[str, int] | None = dict(stored.fetchall()) if stored else None
                planned = plan(rows, writes, start, now, sizes)
                fetch = planned.fetch_keys()
                results = planned.results
                if fetch:  # one more round trip, before the batch's rows are written
                    values = conn.execute(
                        "SELECT key, value, content_type FROM kv WHERE key = ANY(%s)", (fetch,)
                    ).fetchall()
                    results = planned.filled({key: (bytes(v), ct) for key, v, ct in values})
                if planned.puts:
                    conn.execute(_UPSERT, _columns(planned.puts.values()))
                if planned.deletes:
                    conn.execute("DELETE FROM kv WHERE key = ANY(%s)", (planned.deletes,))
                if planned.revision != start:
                    _log(conn, planned.events, now)
                    conn.execute(
                        "UPDATE meta SET value = %s WHERE name = 'revision'", (planned.revision,)
                    )
                commit()
            return results

        try:
            results = self._run(batch)
        except OutcomeUnknown:
            self.feed.notify()  # it may have committed: this process's watchers look
            raise
        finally:
            self._batch_locked = False
        self.on_commit(len(writes))
        self.feed.notify()
        return results

    def purge_expired(self, limit: int = 500) -> int:
        """Delete up to limit expired rows in one short transaction; return how many.

        They take one revision, and each is an EXPIRED event of it.
        """

        def purge(conn: psycopg.Connection) -> int:
            with self._transaction(conn) as commit:
                conn.execute(_LOCK_REVISION)
                now = self._now_ms()
                # The outer expires_at test guards against a row rewritten
                # since the subquery chose it (READ COMMITTED rechecks only
                # the outer WHERE on the new row version).
                keys = sorted(
                    row[0]
                    for row in conn.execute(
                        "DELETE FROM kv WHERE key IN (SELECT key FROM kv WHERE expires_at <= %s"
                        " ORDER BY expires_at LIMIT %s) AND expires_at <= %s RETURNING key",
                        (now, limit, now),
                    )
                )
                if keys:
                    revision = _scalar(
                        conn.execute(
                            "UPDATE meta SET value = value + 1 WHERE name = 'revision'"
                            " RETURNING value"
                        )
                    )
                    _log(
                        conn, [Event(revision, n, key, EXPIRED) for n, key in enumerate(keys)], now
                    )
                commit()
            return len(keys)

        count = self._run(purge)
        if count:
            self.feed.notify()
        return count

    # -- the change log (kvapp.store.base; watchers in kvapp.web.watch) -------

    def history(
        self, after: tuple[int, int], prefix: str, limit: int, max_bytes: int = PAGE_BYTES
    ) -> History:
        """Return up to limit Events after the position after whose keys start with prefix.

        From one REPEATABLE READ transaction: one snapshot for the revision,
        the floor and the events
        (https://www.postgresql.org/docs/current/transaction-iso.html#XACT-REPEATABLE-READ).
        The page's running total of value sizes (octet_length reads a TOASTed
        value's size, not the value) picks the events up to max_bytes before
        any value is read: psycopg receives a whole result at once.
        """
        revision, n = after
        where, params = "", []
        if prefix:
            operator, lower, upper = key_range(prefix, None)
            where, params = f" AND key {operator} %s", [lower]
            if upper is not None:
                where += " AND key < %s"
                params.append(upper)
        # The filter is outside the LIMIT: the page is a range scan of the
        # primary key, and a value past the cut is never detoasted (a join
        # back to changes made the planner scan the whole log: 10.7 ms a
        # page at 100,000 changes, against 0.74 ms).
        sql = (
            "SELECT revision, n, key, kind, value, content_type, expires_at, upto FROM ("
            " SELECT revision, n, key, kind, value, content_type, expires_at,"
            " sum(coalesce(octet_length(value), 0)) OVER (ORDER BY revision, n) AS upto,"
            " coalesce(octet_length(value), 0) AS size FROM changes"
            f" WHERE revision >= %s AND (revision > %s OR n > %s) AND revision <= %s{where}"
            " ORDER BY revision, n LIMIT %s) AS page"
            " WHERE upto - size < %s ORDER BY revision, n"
        )

        def read(conn: psycopg.Connection) -> History:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            try:
                meta: dict[str, int] = dict(
                    conn.execute(
                        "SELECT name, value FROM meta WHERE name IN ('revision', 'history_floor')"
                    ).fetchall()
                )
                rows = conn.execute(
                    sql,
                    (revision, revision, n, meta["revision"], *params, limit, max(max_bytes, 1)),
                    binary=True,
                ).fetchall()
            finally:
                if not conn.broken:
                    conn.execute("ROLLBACK")
            events = [
                Event(r, i, key, kind, None if value is None else bytes(value), ctype, expires)
                for r, i, key, kind, value, ctype, expires, _ in rows
            ]
            cut = bool(limit) and (len(rows) == limit or bool(rows) and rows[-1][7] >= max_bytes)
            return History(meta["revision"], meta["history_floor"], events, cut)

        return self._run(read, writing=False)

    def trim_history(self, max_age_seconds: int, keep: int, limit: int = 500) -> int:
        """Remove the oldest revisions' events: past max_age_seconds, or past the newest keep."""

        def trim(conn: psycopg.Connection) -> int:
            with self._transaction(conn) as commit:
                beyond = conn.execute(
                    "SELECT revision FROM changes ORDER BY revision DESC, n DESC LIMIT 1 OFFSET %s",
                    (keep,),
                ).fetchone()
                oldest = conn.execute(
                    "SELECT revision, committed_at FROM changes ORDER BY revision, n LIMIT %s",
                    (limit + 1,),
                ).fetchall()
                before_ms = self._now_ms() - max_age_seconds * 1000
                cut = history_cut(oldest, before_ms, None if beyond is None else beyond[0], limit)
                if cut is None:
                    return 0
                removed = conn.execute("DELETE FROM changes WHERE revision <= %s", (cut,)).rowcount
                conn.execute(
                    "UPDATE meta SET value = GREATEST(value, %s) WHERE name = 'history_floor'",
                    (cut,),
                )
                commit()
            return int(removed)

        return self._run(trim)

    def revision(self) -> int:
        """Return the store's revision, read now."""
        return int(self._read("SELECT value FROM meta WHERE name = 'revision'", ())[0][0])

    def _listen(self, timeout: float) -> bool:
        """Return True once another session's write transaction commits, False after timeout.

        Only the feed's listener calls this, on a connection of its own that
        LISTENs to CHANNEL (opened again in a forked worker, or after it broke).
        """
        conn = self._listener
        if conn is None or conn.closed or self._listener_pid != os.getpid():
            if self._closed:
                raise StorageUnavailable(CLOSED)
            conn = psycopg.connect(self.url, **self._kwargs)
            guard = self._watchdog.guard(conn, self.timeout_seconds)
            try:
                with guard:
                    conn.execute(f"LISTEN {CHANNEL}")
            except psycopg.Error:
                conn.close()
                raise
            if guard.timed_out:
                conn.close()
                raise StorageUnavailable(TIMED_OUT.format(seconds=guard.seconds, stored=""))
            self._listener, self._listener_pid = conn, os.getpid()
        try:
            for _ in conn.notifies(timeout=timeout, stop_after=1):
                return True
        except psycopg.Error:
            with suppress(psycopg.Error):
                conn.close()
            raise
        return False

    def _stop_listening(self) -> None:
        """Close the listener's connection: the feed's listener stopped, or the store closes.

        A session that LISTENs but is never read holds back the server's
        notification queue, which every kvapp write adds to: once its socket
        buffers fill, the queue, shared by the whole cluster, grows until
        every NOTIFY, and so every write, fails
        (https://www.postgresql.org/docs/current/sql-notify.html).
        """
        conn = self._listener
        if conn is not None and self._listener_pid == os.getpid():
            self._listener = None
            with suppress(psycopg.Error):
                conn.close()

    # -- the data tools' interface (kvapp.tools.transfer) -

    def dump(self, after: str | None, limit: int) -> list[Record]:
        """Return up to limit live records whose keys sort above after, in UTF-8 byte order."""
        where, params = ("key > %s AND ", [after]) if after is not None else ("", [])
        rows = self._read(
            "SELECT key, value, content_type, revision, expires_at FROM kv"
            f" WHERE {where}(expires_at IS NULL OR expires_at > %s) ORDER BY key LIMIT %s",
            (*params, self._now_ms(), limit),
            binary=True,
        )
        return [Record(key, bytes(value), *rest) for key, value, *rest in rows]

    def reserve(self, count: int) -> int:
        """Take the next count revisions for a load; return the revision before them."""

        def reserve(conn: psycopg.Connection) -> int:
            with self._transaction(conn, pipelined=True) as commit:
                before = conn.execute(
                    "UPDATE meta SET value = value + %s WHERE name = 'revision'"
                    " RETURNING value - %s",
                    (count, count),
                ).fetchone()
                conn.execute(_FLOOR_TO_REVISION)
                conn.execute(f"NOTIFY {CHANNEL}")
                commit()
            assert before is not None
            return int(before[0])

        before = self._run(reserve)
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

        def load(conn: psycopg.Connection) -> None:
            with self._transaction(conn, pipelined=True) as commit:
                conn.execute(_LOCK_REVISION)
                last = {record.key: record for record in records}  # as if one by one
                conn.execute(_LOAD, _columns(last.values()))
                conn.execute(
                    "UPDATE meta SET value = GREATEST(value + 1, %s) WHERE name = 'revision'",
                    (max(record.revision for record in records),),
                )
                conn.execute(_FLOOR_TO_REVISION)
                conn.execute(f"NOTIFY {CHANNEL}")
                commit()

        self._run(load)
        self.feed.notify()
