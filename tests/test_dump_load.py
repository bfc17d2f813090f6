"""SQLiteStore.dump and SQLiteStore.load, the data tools' interface to every backend.

Every test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import sqlite3
import time

import psycopg
import pytest
from helpers import stored

from kvapp.store import open_store
from kvapp.store.base import Put, Record, StorageError, Write
from kvapp.store.location import is_postgres_url

TEXT = "text/plain; charset=utf-8"

pytestmark = pytest.mark.backends("sqlite", "postgres")


@pytest.fixture
def repo(make_settings):
    repository = open_store(make_settings())
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


def test_load_replaces_and_keeps_revisions_in_one_transaction(repo, database):
    repo.apply(Write.of(Put("a", b"old", TEXT)))
    records = [Record("a", b"new", "x/y", 40, None), Record("b", b"2", TEXT, 7, now_ms() + 1000)]
    repo.load(records)
    assert repo.dump(None, 10) == records
    # Committed: another connection sees it, and the revision counter moved past 40.
    assert stored(database, "SELECT value FROM meta WHERE name = 'revision'") == [(40,)]
    # The next write gets a revision no loaded key has.
    assert repo.apply(Write.of(Put("c", b"3", TEXT))).revision == 41
    # A load with lower revisions never lowers the counter; it takes a
    # revision of its own (42), which passes every watcher's position.
    repo.load([Record("d", b"4", TEXT, 2, None)])
    assert repo.apply(Write.of(Put("e", b"5", TEXT))).revision == 43


def fail_inserts_of_b(database: str) -> None:
    """Make the database refuse to store the key b, as a full disk would, half-way."""
    if is_postgres_url(database):
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute(
                "CREATE FUNCTION fail() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                " IF NEW.key = 'b' THEN RAISE EXCEPTION 'injected failure'; END IF;"
                " RETURN NEW; END $$;"
                " CREATE TRIGGER fail BEFORE INSERT ON kv FOR EACH ROW EXECUTE FUNCTION fail()"
            )
        return
    conn = sqlite3.connect(database)
    conn.execute(
        "CREATE TRIGGER fail BEFORE INSERT ON kv WHEN NEW.key = 'b'"
        " BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
    )
    conn.commit()
    conn.close()


def test_a_failed_load_stores_nothing_of_its_batch(repo, database):
    fail_inserts_of_b(database)
    with pytest.raises(StorageError, match="injected failure"):
        repo.load([Record("a", b"1", TEXT, 1, None), Record("b", b"2", TEXT, 2, None)])
    assert repo.dump(None, 10) == []
    repo.load([])
    assert repo.dump(None, 10) == []


def test_a_key_loaded_twice_in_one_batch_keeps_the_last(repo):
    repo.load([Record("k", b"1", TEXT, 1, None), Record("k", b"2", TEXT, 2, None)])
    assert repo.dump(None, 10) == [Record("k", b"2", TEXT, 2, None)]
