"""The change log under the store contract, on SQLite and PostgreSQL.

Every change is an Event of its Write's revision, committed with it; the
sweeper writes expiry events and trims old ones through the primary key;
a load raises the history floor; the feed wakes watchers after a commit
made by another store object (another process, as far as the feed knows).
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from kvapp.store import feed as feed_module
from kvapp.store import open_store
from kvapp.store.base import (
    WHOLE,
    Condition,
    ConditionFailed,
    Delete,
    Event,
    History,
    Put,
    Record,
    Write,
)
from kvapp.store.plan import history_cut
from kvapp.web.watch import trimmed

pytestmark = pytest.mark.backends("sqlite", "postgres")

T = "text/plain"


def put(key, value=b"v", ttl=None, condition=None):
    return Put(key, value, T, ttl, condition)


def test_every_change_is_one_event_numbered_within_its_revision(repo, clock):
    repo.apply(Write.of(put("a", b"1"), put("b", b"2", ttl=5)))
    repo.apply(Write.of(Delete("a"), put("c", b"3")))
    repo.apply(Write.of(Delete("absent")))  # changes nothing: no revision, no event
    deadline = int(clock() * 1000) + 5000
    assert repo.history((0, 0), "", 100) == History(
        2,
        0,
        [
            Event(1, 0, "a", "put", b"1", T, None),
            Event(1, 1, "b", "put", b"2", T, deadline),
            Event(2, 0, "a", "delete"),
            Event(2, 1, "c", "put", b"3", T, None),
        ],
    )


def test_a_failed_condition_leaves_no_event(repo):
    repo.apply(Write.of(put("a")))
    with pytest.raises(ConditionFailed):
        repo.apply(Write.of(put("b"), put("a", condition=Condition(if_none_match="*"))))
    assert [event.key for event in repo.history((0, 0), "", 100).events] == ["a"]


def test_history_reads_after_a_position_within_a_prefix_a_page_at_a_time(repo):
    repo.apply(Write.of(put("config/a"), put("other"), put("config/b")))
    repo.apply(Write.of(put("config/c")))
    page = repo.history((1, 0), "config/", 1)
    assert (page.revision, [(e.revision, e.n, e.key) for e in page.events]) == (
        2,
        [(1, 2, "config/b")],
    )
    assert [e.key for e in repo.history((1, 2), "config/", 10).events] == ["config/c"]
    assert repo.history((1, WHOLE), "", 10).events == [Event(2, 0, "config/c", "put", b"v", T)]
    assert repo.history((2, WHOLE), "", 10).events == []


def test_the_sweeper_removal_of_expired_keys_is_one_revision_of_expiry_events(repo, clock):
    repo.apply(Write.of(put("b", ttl=1), put("a", ttl=1), put("keep")))
    clock.now += 1
    assert repo.purge_expired() == 2
    assert repo.history((1, WHOLE), "", 10) == History(
        2, 0, [Event(2, 0, "a", "expired"), Event(2, 1, "b", "expired")]
    )
    assert repo.purge_expired() == 0
    assert repo.history((0, 0), "", 0).revision == 2


def test_a_delete_of_an_expired_key_is_an_expiry_event(repo, clock):
    repo.apply(Write.of(put("a", ttl=1)))
    clock.now += 2
    outcome = repo.apply(Write.of(Delete("a")))
    assert outcome.existed == (False,)  # the client is told 404
    assert repo.history((1, WHOLE), "", 10).events == [Event(2, 0, "a", "expired")]


def test_trimming_by_count_removes_whole_revisions_and_raises_the_floor(repo):
    for n in range(4):
        repo.apply(Write.of(put(f"k{n}"), put(f"j{n}")))  # two events per revision
    # Keep at most 3 events: revision 3 would be split, so it goes whole.
    assert repo.trim_history(3600, 3) == 6
    history = repo.history((0, 0), "", 100)
    assert (history.floor, [e.revision for e in history.events]) == (3, [4, 4])
    assert repo.trim_history(3600, 3) == 0


def test_trimming_by_age_removes_what_is_older(repo, clock):
    repo.apply(Write.of(put("old")))
    clock.now += 100
    repo.apply(Write.of(put("new")))
    assert repo.trim_history(100, 1000) == 0  # committed exactly 100 s ago: kept
    clock.now += 1
    assert repo.trim_history(100, 1000) == 1
    history = repo.history((0, 0), "", 100)
    assert (history.floor, [e.key for e in history.events]) == (1, ["new"])


def test_trimming_goes_a_batch_at_a_time(repo):
    for n in range(7):
        repo.apply(Write.of(put(f"k{n}")))
    assert repo.trim_history(3600, 0, limit=3) == 3
    assert repo.history((0, 0), "", 0).floor == 3
    assert repo.trim_history(3600, 0, limit=3) == 3
    assert repo.trim_history(3600, 0, limit=3) == 1
    assert repo.history((0, 0), "", 100) == History(7, 7, [])


def test_a_load_is_not_in_the_log_and_raises_the_floor_past_it(repo):
    repo.apply(Write.of(put("a")))
    repo.load([Record("b", b"2", T, 40, None)])
    assert repo.history((0, 0), "", 100) == History(
        40, 40, [Event(1, 0, "a", "put", b"v", T, None)]
    )


def test_a_load_of_older_revisions_still_passes_every_watcher(repo):
    # Restoring yesterday's export of the same store: every loaded revision
    # is at or below the store's.  A watcher caught up with the store must
    # not resume past the load as if nothing had changed: it gets the 410.
    for n in range(5):
        repo.apply(Write.of(put(f"k{n}")))
    caught_up = (repo.history((0, 0), "", 100).revision, WHOLE)
    repo.load([Record("k0", b"restored", T, 2, None)])
    after = repo.history(caught_up, "", 100)
    assert after.events == [] and trimmed(caught_up, after.floor)
    repo.apply(Write.of(put("next")))
    assert repo.get("next").revision == after.revision + 1


def test_another_store_object_s_commit_wakes_this_one_s_feed(make_settings):
    # Two store objects on one database: as two processes, each its own feed.
    writer = open_store(make_settings())
    watcher = open_store(make_settings())
    try:
        version = watcher.feed.version
        woken = threading.Event()

        def wait() -> None:
            if watcher.feed.wait(version, 20) != version:
                woken.set()

        thread = threading.Thread(target=wait)
        thread.start()
        writer.apply(Write.of(put("a")))
        thread.join(25)
        assert woken.is_set()
        assert [e.key for e in watcher.history((0, 0), "", 10).events] == ["a"]
    finally:
        writer.close()
        watcher.close()


def test_a_commit_before_the_listener_started_still_wakes_a_waiter(make_settings):
    # The waiter read the store (its version) before the other process
    # committed; its wait starts the listener only after that commit, when
    # PostgreSQL's LISTEN no longer hears the NOTIFY and the revision the
    # listener first reads already holds the commit.
    writer = open_store(make_settings())
    watcher = open_store(make_settings())
    try:
        version = watcher.feed.version
        writer.apply(Write.of(put("a")))
        assert watcher.feed.wait(version, 20) != version
    finally:
        writer.close()
        watcher.close()


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize(
    ("oldest", "before", "beyond", "limit", "cut"),
    [
        ([], 100, None, 10, None),
        ([(1, 200), (2, 300)], 100, None, 10, None),  # all young, none beyond the count
        ([(1, 50), (2, 300)], 100, None, 10, 1),  # the walk stops at the first young one
        ([(1, 50), (2, 50), (2, 50), (3, 300)], 100, None, 10, 2),
        ([(1, 300), (2, 300)], 100, 1, 10, 1),  # beyond the count kept
        ([(1, 50), (2, 50), (3, 50)], 100, None, 2, 2),  # a full batch: the last may go on
        ([(5, 50), (5, 50), (5, 50)], 100, None, 2, 5),  # unless it is the only revision
    ],
)
def test_history_cut(oldest, before, beyond, limit, cut):
    assert history_cut(oldest, before, beyond, limit) == cut


@pytest.mark.backends("postgres")
def test_the_listener_lets_go_of_its_session_once_no_watcher_waits(
    make_settings, database, monkeypatch
):
    # A session that LISTENs and is never read holds back the notification
    # queue of the whole cluster, which every kvapp write adds to.
    monkeypatch.setattr(feed_module, "LINGER_SECONDS", 0.5)
    store = open_store(make_settings())

    def listening() -> int:
        with psycopg.connect(database, autocommit=True) as admin:
            row = admin.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query LIKE 'LISTEN %'"
            ).fetchone()
        return row[0]

    def becomes(count: int) -> bool:
        deadline = time.monotonic() + 20
        while listening() != count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    try:
        for _ in range(2):  # and again for the next watcher
            version = store.feed.version
            waiter = threading.Thread(target=store.feed.wait, args=(version, 2))
            waiter.start()
            assert becomes(1)
            waiter.join()
            assert becomes(0)
    finally:
        store.close()


@pytest.mark.parametrize("sizes", [[400_000] * 7, [3_000_000, 1, 2], [0, 0, 5, 1_048_576, 0]])
def test_a_page_of_history_ends_at_its_bytes_and_the_next_goes_on_from_there(repo, sizes):
    repo.apply(Write.of(*(put(f"k{n}", b"x" * size) for n, size in enumerate(sizes))))
    budget = 1_048_576
    position, pages = (0, 0), []
    while True:
        page = repo.history(position, "", 1000, budget)
        if page.events:
            values = [len(e.value) for e in page.events]
            # Under the budget but for the last event, which takes it there.
            assert sum(values[:-1]) < budget
            assert page.cut == (sum(values) >= budget)
            pages.append([e.n for e in page.events])
            position = (page.events[-1].revision, page.events[-1].n)
        if not page.cut:
            break
    assert [n for page in pages for n in page] == list(range(len(sizes)))
    assert repo.history((0, 0), "", 2).cut and not repo.history((0, 0), "", 0).cut


@pytest.mark.backends("postgres")
def test_watchers_waiting_in_turns_keep_one_listening_session(make_settings, monkeypatch):
    # The tail's refresher reads the log between two waits: a listener that
    # stopped whenever nobody waited reconnected at nearly every commit.
    store = open_store(make_settings())
    writer = open_store(make_settings())
    opened = []
    connect = psycopg.connect
    monkeypatch.setattr(psycopg, "connect", lambda *a, **k: opened.append(1) or connect(*a, **k))
    try:
        for n in range(10):
            version = store.feed.version
            writer.apply(Write.of(put(f"k{n}")))
            assert store.feed.wait(version, 20) != version
            time.sleep(0.3)  # longer than one listen(): the listener sees nobody waiting
        assert len(opened) == 1
    finally:
        writer.close()
        store.close()
