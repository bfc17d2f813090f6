"""A bulk loader for tests and benchmarks: many records into a database, fast.

It goes through SQLiteStore.load, the data tools' own write path, in large
transactions, so a million keys take seconds rather than the hours that a
million requests with an fsync each would.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

from kvapp.store.base import Record
from kvapp.store.sqlite import SQLiteStore

TEXT = "text/plain; charset=utf-8"
BATCH = 50_000


def sample(count: int, start: int = 0, expires_at: int | None = None) -> Iterator[Record]:
    """Yield count varied records, keys in byte order: text, binary and expiring values.

    Every 7th value is binary (not UTF-8), every 5th key has a TTL at
    expires_at when one is given, and every 11th key is non-ASCII.
    """
    for i in range(start, start + count):
        key = f"key-{i:09d}" + ("-é" if i % 11 == 0 else "")
        if i % 7 == 0:
            value, content_type = b"\xff\x00" + i.to_bytes(4, "big"), "application/octet-stream"
        else:
            value, content_type = f"value {i}".encode(), TEXT
        ttl = expires_at if i % 5 == 0 else None
        yield Record(key, value, content_type, i + 1, ttl)


def fill(path: Path, records: Iterator[Record], batch: int = BATCH) -> int:
    """Load records into the database at path (created if missing); return how many."""
    repository = SQLiteStore(str(path), synchronous="NORMAL", startup_check_max_bytes=0)
    count = 0
    try:
        while chunk := list(itertools.islice(records, batch)):
            repository.load(chunk)
            count += len(chunk)
    finally:
        repository.close()
    return count
