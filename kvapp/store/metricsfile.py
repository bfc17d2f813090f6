"""The shared metrics file: every line of SQL for the counters that all processes add to.

A small SQLite file beside the database, separate from it so that metrics
never take the data's write lock.  Processes add deltas with an upsert, so
the table holds one row per series whatever the number of processes or
restarts, and counters keep growing across restarts as Prometheus expects.
synchronous=NORMAL: a power cut may lose the last second of counts, never
the file (https://sqlite.org/wal.html#performance_considerations).
"""

from __future__ import annotations

import hashlib
import sqlite3
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

from kvapp.store.location import is_postgres_url, redact
from kvapp.store.sqlite import translated

Row = tuple[str, str, str, float]
"""(metric, labels, le, value): labels in exposition syntax; le is '' outside histograms."""

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS samples ("
    " metric TEXT NOT NULL, labels TEXT NOT NULL, le TEXT NOT NULL, value REAL NOT NULL,"
    " PRIMARY KEY (metric, labels, le)) WITHOUT ROWID"
)


def metrics_path(database: str, configured: str = "") -> str:
    """Return the metrics file of this host's processes serving database.

    The metrics_path setting if given; beside an SQLite file, kv.sqlite3 ->
    kv-metrics.sqlite3 and kv.db -> kv-metrics.db (the suffix kept, so that
    two databases of one folder never add to one file); for a PostgreSQL
    URL, a file in the system temp folder named after a hash of the URL, so
    every worker on this host that serves that database adds to one file,
    and each host has its own (Prometheus scrapes each host as its own
    instance).
    """
    if configured:
        return configured
    if is_postgres_url(database):
        digest = hashlib.sha256(redact(database).encode("utf-8")).hexdigest()[:16]
        return str(Path(tempfile.gettempdir()) / f"kvapp-{digest}-metrics.sqlite3")
    path = Path(database)
    return str(path.with_name(f"{path.stem}-metrics{path.suffix}"))


class MetricsStore:
    """The metrics file, opened on first use; errors are StorageErrors."""

    def __init__(self, path: str, busy_timeout_ms: int = 5000) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute(_SCHEMA)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def add(self, rows: Iterable[Row]) -> None:
        """Add each row's value to its series, all in one transaction."""
        with self._lock, translated():
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "INSERT INTO samples (metric, labels, le, value) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (metric, labels, le)"
                    " DO UPDATE SET value = value + excluded.value",
                    rows,
                )
                conn.execute("COMMIT")
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")

    def read(self) -> list[Row]:
        """Return every series, as summed over all processes so far."""
        with self._lock, translated():
            return (
                self._connection()
                .execute("SELECT metric, labels, le, value FROM samples ORDER BY metric, labels")
                .fetchall()
            )

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
