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
from kvapp.store.base import MAY_BE_STORED, OutcomeUnknown, Put, Record, StorageError, Write
from kvapp.store.location import is_postgres_url
from kvapp.store.sqlite import SQLiteStore
from kvapp.tools import targets, transfer
from kvapp.tools.targets import Target

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


def test_reserve_takes_revisions_that_no_write_gets(repo):
    assert repo.apply(Write.of(Put("a", b"1", TEXT))).revision == 1
    assert repo.reserve(10) == 1
    assert repo.revision() == 11
    assert repo.apply(Write.of(Put("b", b"2", TEXT))).revision == 12
    # A watcher from before must list the keys again: the floor passed it.
    assert repo.history((1, 0), "", 10).floor >= 11


def test_a_merge_of_nothing_leaves_the_history_floor_where_it_was(repo):
    repo.apply(Write.of(Put("a", b"1", TEXT)))
    before = repo.history((0, 0), "", 10)
    target = Target(repo, fresh=False, empty=False)
    assert transfer.load([], target, transfer.Tally(), highest=0) == 0
    after = repo.history((0, 0), "", 10)
    assert (after.floor, after.revision, len(after.events)) == (before.floor, 1, 1)


def test_a_merge_whose_revisions_would_pass_the_export_format_s_bound_is_refused(repo):
    from kvapp.tools import exportformat

    repo.load([Record("a", b"1", TEXT, exportformat.MAX_REVISION - 5, None)])
    target = Target(repo, fresh=False, empty=False)
    records = [Record("b", b"2", TEXT, 10, None)]
    with pytest.raises(targets.StoreError, match="the export format's bound"):
        transfer.load(records, target, transfer.Tally(), highest=10)
    assert [record.key for record in repo.dump(None, 10)] == ["a"]


def test_a_load_leaves_a_row_equal_to_its_record_and_its_etag_alone(repo):
    repo.load([Record("same", b"v", TEXT, 5, None), Record("other", b"v", TEXT, 6, None)])
    repo.load(
        [
            Record("same", b"v", TEXT, 9, None),  # equal but for the revision: left alone
            Record("other", b"v", TEXT, 9, now_ms() + 60_000),  # another expiry: replaced
        ]
    )
    assert [(r.key, r.revision) for r in repo.dump(None, 10)] == [("other", 9), ("same", 5)]


def test_a_failed_import_into_an_empty_live_store_keeps_what_clients_wrote_meanwhile(repo):
    records = [Record(f"k{n:05d}", b"loaded", TEXT, n + 1, None) for n in range(3 * transfer.PAGE)]

    def source():
        yield from records[: transfer.PAGE]
        # Clients of a live server write while the import runs: a key the
        # import never loads, one it loads later, and one it loaded already.
        repo.apply(Write.of(Put("a-client", b"acknowledged", TEXT)))
        repo.apply(Write.of(Put("k01500", b"acknowledged", TEXT)))
        repo.apply(Write.of(Put("k00010", b"acknowledged", TEXT)))
        yield from records[transfer.PAGE : 2 * transfer.PAGE]
        raise OSError("the export file could not be read")

    tally = transfer.Tally()
    with pytest.raises(OSError):
        transfer.load(source(), Target(repo, fresh=False, empty=True), tally, highest=3000)
    left = {record.key: record.value for record in repo.dump(None, 10)}
    # What the import loaded is gone; "k01500" was loaded over the client's
    # value (an import replaces keys), the other two keep their writes.
    assert left == {"a-client": b"acknowledged", "k00010": b"acknowledged"}
    assert (tally.records, tally.last_key) == (0, None)


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


def test_a_failed_import_into_an_empty_store_leaves_it_empty_even_if_its_last_load_committed(
    repo,
):
    # PostgreSQL answers OutcomeUnknown when the answer to a COMMIT is lost:
    # that batch may be stored, and its keys too must be erased.
    records = [Record(f"k{n:05d}", b"v", TEXT, 1, None) for n in range(transfer.PAGE + 5)]
    load = repo.load

    def load_then_lose_the_answer(batch: list[Record]) -> None:
        load(batch)
        if batch[-1].key == records[-1].key:
            raise OutcomeUnknown(f"the answer was lost: {MAY_BE_STORED}")

    repo.load = load_then_lose_the_answer
    tally = transfer.Tally()
    with pytest.raises(OutcomeUnknown):
        transfer.load(records, Target(repo, fresh=False, empty=True), tally, highest=1)
    assert repo.dump(None, 10) == [] and (tally.records, tally.last_key) == (0, None)


@pytest.mark.backends("sqlite")
def test_a_new_database_that_appeared_during_an_import_is_not_replaced(make_settings, tmp_path):
    # A server started on the path while the import ran made a database
    # there: the import must fail rather than replace it with its own file.
    path = tmp_path / "new" / "kv.sqlite3"
    with pytest.raises(targets.StoreError, match="appeared while this ran, and is left as it is"):
        with targets.destination(str(path), make_settings(), merge=False) as target:
            target.store.load([Record("mine", b"1", TEXT, 1, None)])
            meanwhile = SQLiteStore(str(path))
            meanwhile.set_many([("theirs", b"2", TEXT)])
            meanwhile.close()
    again = SQLiteStore(str(path))
    try:
        assert [record.key for record in again.dump(None, 10)] == ["theirs"]
    finally:
        again.close()
