"""The repository's writes as values: batches, conditions, revisions, TTL rows, listing.

Each contract test runs on both backends; the query-plan tests are SQLite's
(test_postgres.py has PostgreSQL's).
"""

from __future__ import annotations

import sqlite3

import pytest
from helpers import VERSION_1, stored

from kvapp.store.base import (
    ANY,
    WHOLE,
    Condition,
    ConditionFailed,
    Delete,
    Event,
    History,
    Outcome,
    Put,
    Write,
    successor,
)
from kvapp.store.sqlite import INDEXES, SCHEMA_VERSION, SQLiteStore
from kvapp.store.sweeper import Sweeper

pytestmark = pytest.mark.backends("sqlite", "postgres")


def put(key, value=b"v", ttl=None, condition=None):
    return Write.of(Put(key, value, "text/plain", ttl, condition))


def test_each_write_of_a_batch_gets_its_own_revision(repo):
    results = repo.apply_batch([put("a", b"1"), put("a", b"2"), put("b")])
    assert [r.revision for r in results] == [1, 2, 3]
    assert [r.existed for r in results] == [(False,), (True,), (False,)]
    assert repo.get("a") == (b"2", "text/plain", 2)


def test_a_failed_condition_fails_alone_in_its_batch(repo):
    repo.apply(put("a", b"1"))
    commits = []
    repo.on_commit = commits.append
    results = repo.apply_batch(
        [
            put("b", b"1"),
            Write.of(
                Put("c", b"x", "text/plain"),  # would be applied, but its Write fails
                Put("a", b"x", "text/plain", condition=Condition(if_match=frozenset({99}))),
            ),
            put("a", b"2", condition=Condition(if_match=frozenset({1}))),
        ]
    )
    assert isinstance(results[1], ConditionFailed) and results[1].key == "a"
    assert results[0].revision == 2 and results[2].revision == 3
    assert repo.get("c") is None
    assert repo.get("a").value == b"2"
    assert commits == [3]


def test_apply_raises_condition_failed(repo):
    with pytest.raises(ConditionFailed):
        repo.apply(put("a", condition=Condition(if_match=ANY)))
    assert repo.get("a") is None


def test_write_of_a_key_twice_is_refused(repo):
    with pytest.raises(ValueError):
        repo.apply(Write.of(Put("a", b"", "t"), Delete("a")))


def test_delete_that_changes_nothing_keeps_the_revision(repo):
    repo.apply(put("a"))
    outcome = repo.apply(Write.of(Delete("zzz")))
    assert outcome == Outcome(1, (False,))
    assert repo.apply(put("b")).revision == 2


@pytest.mark.parametrize(
    ("condition", "revision", "holds"),
    [
        (Condition(), None, True),
        (Condition(if_match=ANY), None, False),
        (Condition(if_match=ANY), 3, True),
        (Condition(if_match=frozenset({3})), 3, True),
        (Condition(if_match=frozenset({2})), 3, False),
        (Condition(if_match=frozenset()), 3, False),
        (Condition(if_none_match=ANY), None, True),
        (Condition(if_none_match=ANY), 3, False),
        (Condition(if_none_match=frozenset({3})), 3, False),
        (Condition(if_none_match=frozenset({2})), 3, True),
        (Condition(if_match=frozenset({3}), if_none_match=frozenset({3})), 3, False),
    ],
)
def test_condition_holds(condition, revision, holds):
    assert condition.holds(revision) is holds


def test_commit_is_on_disk_with_revision_and_expiry(repo, database, clock):
    repo.apply(put("t", ttl=30))
    row = stored(database, "SELECT revision, expires_at FROM kv WHERE key = 't'")
    meta = stored(database, "SELECT value FROM meta WHERE name = 'revision'")
    assert row == [(1, int(clock.now * 1000) + 30_000)]
    assert meta == [(1,)]


def test_purge_removes_only_expired_rows_in_batches(repo, database, clock):
    for i in range(7):
        repo.apply(put(f"t{i}", ttl=1))
    repo.apply(put("keep", ttl=100))
    repo.apply(put("forever"))
    clock.now += 1
    assert repo.purge_expired(limit=3) == 3
    assert Sweeper(repo, interval=0).sweep() == 4
    assert stored(database, "SELECT key FROM kv ORDER BY key") == [("forever",), ("keep",)]


def test_sweeper_thread_runs_and_stops(repo, database, clock):
    repo.apply(put("t", ttl=1))
    clock.now += 1
    sweeper = Sweeper(repo, interval=0.01)
    sweeper.start()
    try:
        for _ in range(500):
            if stored(database, "SELECT count(*) FROM kv") == [(0,)]:
                break
            sweeper._stop.wait(0.01)
        assert stored(database, "SELECT count(*) FROM kv") == [(0,)]
    finally:
        sweeper.stop()
    assert sweeper._thread is None


def plan(db_path, sql, params) -> str:
    conn = sqlite3.connect(db_path)
    try:
        return " ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))
    finally:
        conn.close()


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize(
    ("prefix", "after"), [("", None), ("a", None), ("a", "ab"), ("", "x"), ("\U0010ffff", None)]
)
def test_listing_is_an_index_range_scan(repo, db_path, prefix, after, monkeypatch):
    statements = []
    real = repo._reader

    def spy():
        conn = real()
        conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr(repo, "_reader", spy)
    repo.list_keys(prefix, after, 10)
    sql = next(s for s in reversed(statements) if s.startswith("SELECT key"))
    query_plan = plan(db_path, sql, ())
    assert "SEARCH kv USING INDEX sqlite_autoindex_kv_1 (key>" in query_plan
    assert "SCAN" not in query_plan


@pytest.mark.backends("sqlite")
def test_purge_and_expired_count_use_the_expiry_index(repo, db_path):
    purge = plan(
        db_path,
        "DELETE FROM kv WHERE key IN"
        " (SELECT key FROM kv WHERE expires_at <= ? ORDER BY expires_at LIMIT ?)",
        (0, 1),
    )
    assert "USING INDEX kv_expires_at (expires_at<?)" in purge
    count = plan(db_path, "SELECT count(*) FROM kv WHERE expires_at <= ?", (0,))
    assert "kv_expires_at" in count


@pytest.mark.parametrize(
    ("prefix", "upper"),
    [("", None), ("a", "b"), ("ab", "ac"), ("a\U0010ffff", "b"), ("\U0010ffff", None),
     ("\ud7ff", "\ue000"), ("é", "ê")],
)  # fmt: skip
def test_successor(prefix, upper):
    assert successor(prefix) == upper


def test_a_version_1_database_is_upgraded_in_place(db_path):
    db_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    for statement in VERSION_1:
        conn.execute(statement)
    conn.execute("INSERT INTO kv VALUES ('old', x'31', 'text/plain; charset=utf-8', 7, NULL)")
    conn.close()
    repository = SQLiteStore(str(db_path))
    try:
        assert repository.get("old").value == b"1"
        # Its history starts at its revision: resuming from before it is not possible.
        assert repository.history((7, WHOLE), "", 10) == History(7, 7, [])
        repository.apply(Write.of(Put("new", b"2", "text/plain")))
        assert repository.history((7, WHOLE), "", 10).events == [
            Event(8, 0, "new", "put", b"2", "text/plain", None)
        ]
    finally:
        repository.close()
    conn = sqlite3.connect(db_path)
    names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    version = conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()[0]
    conn.close()
    assert "kv_expires_at" in names
    assert version == SCHEMA_VERSION == 2
    assert "IF NOT EXISTS" in INDEXES[0]


def test_stats_counts_live_keys_and_bytes(repo, clock):
    repo.apply(put("a", ttl=1))
    repo.apply(put("b"))
    keys, size = repo.stats()
    assert keys == 2 and size > 0
    clock.now += 1
    assert repo.stats()[0] == 1
