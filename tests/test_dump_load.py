"""Repository.dump and Repository.load, the data tools' interface to every backend."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from kvapp.repository import Repository, StorageError
from kvapp.writes import Put, Record, Write

TEXT = "text/plain; charset=utf-8"


@pytest.fixture
def repo(db_path: Path):
    repository = Repository(str(db_path))
    yield repository
    repository.close()


def now_ms() -> int:
    return int(time.time() * 1000)


def test_dump_pages_through_live_keys_in_utf8_byte_order(repo):
    keys = ["b", "a", "é", "\U0001f600", "\uffff", "a\x7e", "Z"]
    repo.load([Record(key, key.encode(), TEXT, n + 1, None) for n, key in enumerate(keys)])
    repo.load([Record("expired", b"x", TEXT, 20, now_ms() - 1)])
    ordered = sorted(keys, key=lambda key: key.encode("utf-8"))
    pages, after = [], None
    while page := repo.dump(after, 3):
        pages.append([record.key for record in page])
        after = page[-1].key
    assert pages == [ordered[0:3], ordered[3:6], ordered[6:]]
    assert repo.dump("\U0001f600", 10) == []


def test_dump_gives_every_field_as_stored(repo):
    expires = now_ms() + 60_000
    repo.apply(Write.of(Put("k", b"\x00\xff", "image/png", ttl=60)))
    (record,) = repo.dump(None, 10)
    assert record[:4] == ("k", b"\x00\xff", "image/png", 1)
    assert abs(record.expires_at - expires) < 5_000


def test_load_replaces_and_keeps_revisions_in_one_transaction(repo, db_path):
    repo.apply(Write.of(Put("a", b"old", TEXT)))
    records = [Record("a", b"new", "x/y", 40, None), Record("b", b"2", TEXT, 7, now_ms() + 1000)]
    repo.load(records)
    assert repo.dump(None, 10) == records
    # Committed: another connection sees it, and the revision counter moved past 40.
    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone() == (40,)
    conn.close()
    # The next write gets a revision no loaded key has.
    assert repo.apply(Write.of(Put("c", b"3", TEXT))).revision == 41
    # A load with lower revisions never lowers the counter.
    repo.load([Record("d", b"4", TEXT, 2, None)])
    assert repo.apply(Write.of(Put("e", b"5", TEXT))).revision == 42


def test_a_failed_load_stores_nothing_of_its_batch(repo, db_path):
    conn = sqlite3.connect(db_path)
    conn.execute(
        "CREATE TRIGGER fail BEFORE INSERT ON kv WHEN NEW.key = 'b'"
        " BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
    )
    conn.commit()
    conn.close()
    with pytest.raises(StorageError, match="injected failure"):
        repo.load([Record("a", b"1", TEXT, 1, None), Record("b", b"2", TEXT, 2, None)])
    assert repo.dump(None, 10) == []
    repo.load([])
    assert repo.dump(None, 10) == []
