"""The tail (kvapp.web.tail): what a watcher reads from it is what the change log holds.

The tail keeps each read of the log as one segment and hands a watcher
whose prefix covers a segment's keys the whole segment at once; the rest it
filters change by change.  Here a store of events in a list stands in for
the change log, so that hypothesis can choose the keys, how the changes
fall into reads, how small the pages and the tail's limits are, and what
each watcher asks; every answer must equal the log's own filter.
"""

from __future__ import annotations

import threading
import time
from unittest import mock

import hypothesis.strategies as st
from hypothesis import example, given

from kvapp.store.base import PAGE_BYTES, PUT, WHOLE, Event, History
from kvapp.web import tail
from kvapp.web.tail import Tail
from kvapp.web.watch import event_bytes


class ListLog:
    """A change log in a list: history() as the stores answer it, and trimming."""

    def __init__(self, page_bytes: int = PAGE_BYTES) -> None:
        self.events: list[Event] = []  # every change ever made, trimmed or not
        self.revision = 0
        self.floor = 0  # changes up to this revision are trimmed
        self.page_bytes = page_bytes  # a page's bytes of values, when history() is not told

    def commit(self, keys: list[str]) -> None:
        self.revision += 1
        for n, key in enumerate(keys):
            value = f"{key}@{self.revision}".encode()
            self.events.append(Event(self.revision, n, key, PUT, value, "text/plain"))

    def trim(self) -> None:
        """Remove every change so far from the log, as the sweeper or a load does."""
        self.floor = self.revision

    def history(
        self, after: tuple[int, int], prefix: str, limit: int, max_bytes: int | None = None
    ) -> History:
        max_bytes = self.page_bytes if max_bytes is None else max_bytes
        later = [
            e
            for e in self.events
            if e.revision > self.floor and (e.revision, e.n) > after and e.key.startswith(prefix)
        ]
        page, size = [], 0
        for event in later[:limit]:
            page.append(event)
            size += len(event.value or b"")
            if size >= max_bytes:
                return History(self.revision, self.floor, page, True)
        return History(self.revision, self.floor, page, bool(limit) and len(page) == limit)

    def expected(self, after: tuple[int, int], until: tuple[int, int], prefix: str) -> list[bytes]:
        return [
            event_bytes(e)
            for e in self.events
            if after < (e.revision, e.n) <= until and e.key.startswith(prefix)
        ]


KEYS = st.sampled_from(["a", "ab", "abc", "abd", "b", "ba", "é", "éa"])
PREFIXES = st.sampled_from(["", "a", "ab", "abc", "b", "é", "z"])
COMMIT = st.tuples(st.just("commit"), st.lists(KEYS, min_size=1, max_size=4, unique=True))
REFRESH = st.tuples(st.just("refresh"), st.none())
TRIM = st.tuples(st.just("trim"), st.none())
# A read names a change of the log by its index (taken modulo its length), and
# asks from that change, from after its whole revision, or from before it.
READ = st.tuples(st.just("read"), st.tuples(st.integers(0, 99), st.integers(0, 2), PREFIXES))


def position_of(log: ListLog, pick: int, form: int) -> tuple[int, int]:
    if not log.events:
        return (0, WHOLE)
    event = log.events[pick % len(log.events)]
    return [(event.revision, event.n), (event.revision, WHOLE), (event.revision - 1, WHOLE)][form]


def check_segments(held: Tail, max_bytes: int, max_events: int) -> None:
    """The tail's bookkeeping: segments cover its events in order, and its bounds hold."""
    segments = held._segments
    assert [segment.end for segment in segments] == held._segment_ends
    if segments:
        assert segments[0].start == held._base  # none starts before the oldest change held
        assert segments[-1].end == held._base + len(held._events)
        for before, after in zip(segments, segments[1:], strict=False):
            assert before.end == after.start
    for segment in segments:
        events = held._events[segment.start - held._base : segment.end - held._base]
        assert segment.blob == b"".join(chunk for _, chunk in events)
        assert all(key.startswith(segment.keys_prefix) for key, _ in events)
    # Within its bounds, counting each change's bytes twice (alone and in a blob).
    assert held._bytes == 2 * sum(len(chunk) for _, chunk in held._events)
    assert held._bytes <= max_bytes and len(held._events) <= max_events


@example(  # a page of the log cut by its bytes: the next read goes on after it
    steps=[("commit", ["a", "ab"]), ("refresh", None), ("read", (0, 2, ""))],
    page=5,
    max_events=12,
    max_bytes=4000,
    page_bytes=1,
)
@example(  # a read from the middle of a segment
    steps=[("commit", ["a", "ab"]), ("refresh", None), ("read", (0, 0, ""))],
    page=2,
    max_events=12,
    max_bytes=4000,
    page_bytes=PAGE_BYTES,
)
@example(  # the log trimmed past the tail's start: it starts again, empty
    steps=[
        ("commit", ["a"]),
        ("refresh", None),
        ("trim", None),
        ("refresh", None),
        ("commit", ["b"]),
        ("refresh", None),
        ("read", (0, 1, "")),
    ],
    page=5,
    max_events=12,
    max_bytes=4000,
    page_bytes=PAGE_BYTES,
)
@given(
    steps=st.lists(st.one_of(COMMIT, REFRESH, TRIM, READ), max_size=60),
    page=st.integers(1, 5),
    max_events=st.integers(2, 12),
    max_bytes=st.integers(200, 4000),  # an event here is 120 to 130 bytes, held twice
    # A value here is 3 to 8 bytes: small budgets cut pages by bytes too.
    page_bytes=st.one_of(st.integers(1, 20), st.just(PAGE_BYTES)),
)
def test_every_read_of_the_tail_is_the_change_logs_own_filter(
    steps, page, max_events, max_bytes, page_bytes
):
    log = ListLog(page_bytes)
    held = Tail(log, event_bytes)
    with (
        mock.patch.object(tail, "PAGE", page),
        mock.patch.object(tail, "MAX_EVENTS", max_events),
        mock.patch.object(tail, "MAX_BYTES", max_bytes),
    ):
        held._refresh()  # the first read only places the tail at the store's revision
        for action, argument in steps:
            if action == "commit":
                log.commit(argument)
            elif action == "trim":
                log.trim()
            elif action == "refresh":
                held._refresh()
                check_segments(held, max_bytes, max_events)
            else:
                pick, form, prefix = argument
                position = position_of(log, pick, form)
                answer = held.read(position, prefix)
                if answer is None:  # before the tail's start: the watcher reads the log
                    assert held._start is None or position < held._start
                    continue
                chunks, count, end = answer
                assert end == max(position, held._end)
                wanted = log.expected(position, end, prefix)
                assert b"".join(chunks) == b"".join(wanted)
                assert count == len(wanted)


def test_a_watcher_of_a_prefix_that_covers_a_read_gets_it_as_one_chunk():
    log = ListLog()
    held = Tail(log, event_bytes)
    held._refresh()
    log.commit(["users/ann", "users/bob"])
    log.commit(["users/cy"])
    held._refresh()  # one read of the log: one segment, keys under "users/"
    log.commit(["orders/1", "users/dee"])
    held._refresh()
    chunks, count, _ = held.read((0, WHOLE), "users/")
    assert count == 4
    # The first read whole, then the one change of the mixed second read.
    assert [bytes(chunk).count(b"\n\n") for chunk in chunks] == [3, 1]
    everything, count, _ = held.read((0, WHOLE), "")
    assert (len(everything), count) == (2, 5)


class Sleeper:
    """A thread in Tail.wait(position, prefix), and what the wait returned."""

    def __init__(self, held: Tail, position: tuple[int, int], prefix: str) -> None:
        self.returned: list[bool] = []
        self.thread = threading.Thread(
            target=lambda: self.returned.append(held.wait(position, prefix, 30)), daemon=True
        )
        self.thread.start()

    def answer(self) -> bool:
        self.thread.join(30)
        assert not self.thread.is_alive()
        return self.returned[0]


def asleep(held: Tail, *prefixes: str) -> dict[str, mock.MagicMock]:
    """Wait until a watcher of each prefix sleeps in the tail; spy on the wake-up of each."""
    for _ in range(3000):
        with held._lock:
            if all(prefix in held._waiting for prefix in prefixes):
                return {
                    prefix: mock.patch.object(
                        held._waiting[prefix].woken,
                        "notify_all",
                        wraps=held._waiting[prefix].woken.notify_all,
                    ).start()
                    for prefix in prefixes
                }
        time.sleep(0.01)
    raise AssertionError(f"no watcher of {prefixes} went to sleep")


def caught_up(keys: list[str], prefix: str) -> tuple[ListLog, Tail, tuple[int, int]]:
    """Return a log with one commit of keys (none: no commit), a tail that has read it,
    and the position of a watcher of prefix that has read the tail."""
    log = ListLog()
    held = Tail(log, event_bytes)
    held._refresh()
    if keys:
        log.commit(keys)
        held._refresh()
    _, _, position = held.read((0, WHOLE), prefix)
    return log, held, position


def test_a_waiting_watcher_wakes_only_for_a_key_under_its_prefix():
    log, held, position = caught_up(["users/ann"], "")
    users, orders, everything = (Sleeper(held, position, p) for p in ("users/", "orders/", ""))
    spies = asleep(held, "users/", "orders/", "")
    try:
        log.commit(["orders/1", "orders/2"])
        held._refresh()  # a read with no users/ key: its watcher sleeps on
        assert [spies[p].call_count for p in ("users/", "orders/", "")] == [0, 1, 1]
        assert orders.answer() and everything.answer()
        log.commit(["orders/3", "users/bob"])
        held._refresh()  # keys under no common prefix but "": each is looked at
        assert spies["users/"].call_count == 1
        assert users.answer()
    finally:
        mock.patch.stopall()
        held.wake()


def test_a_watcher_returns_at_once_if_the_tail_moved_since_its_read_and_on_timeout():
    log, held, position = caught_up(["a"], "b")
    assert held.wait(position, "b", 0.01) is False  # nothing new: it timed out
    log.commit(["a"])
    held._refresh()  # nothing under b, but the watcher has not looked yet
    assert held.wait(position, "b", 30) is True
    _, _, position = held.read(position, "b")
    log.trim()
    log.commit(["a"])
    held._refresh()  # the floor passed the tail's start: it starts again after position
    assert position < held._start
    assert held.wait(position, "b", 30) is True  # before the tail's start: read the log
    assert held._waiting == {}


def test_after_wake_no_watcher_sleeps():
    _, held, position = caught_up([], "x")
    assert held.wait(position, "x", 0.01) is False
    held.wake()  # the server stops: a stream on its way to sleep must not sleep
    assert held.wait(position, "x", 30) is True


@given(
    st.lists(st.lists(KEYS, min_size=1, max_size=4, unique=True), min_size=1, max_size=4),
    st.lists(PREFIXES, min_size=1, max_size=7, unique=True),
)
def test_a_read_wakes_exactly_the_prefixes_it_brought_a_key_under(commits, prefixes):
    log = ListLog()
    held = Tail(log, event_bytes)
    held._refresh()
    for keys in commits:
        log.commit(keys)
    for prefix in prefixes:  # watchers asleep, as Tail.wait leaves them
        held._waiting[prefix] = tail._Waiting(held._lock)
        held._waiting[prefix].woken = mock.Mock()
    held._refresh()  # one read of every commit: one segment
    woken = {p for p in prefixes if held._waiting[p].woken.notify_all.called}
    brought = {p for p in prefixes if any(k.startswith(p) for keys in commits for k in keys)}
    assert woken == brought
    assert all(held._waiting[p].woken.notify_all.call_count <= 1 for p in prefixes)


def test_a_restart_of_the_tail_and_wake_wake_every_watcher():
    log, held, position = caught_up(["a"], "")
    sleepers = [Sleeper(held, position, p) for p in ("x", "y")]
    asleep(held, "x", "y")
    log.commit(["z"])
    log.trim()
    held._refresh()  # the floor passed the tail's start: it starts again, empty
    assert [s.answer() for s in sleepers] == [True, True]
    mock.patch.stopall()
    assert held.read(position, "") is None  # they read the log, then the new tail
    _, _, position = held.read((log.revision, WHOLE), "")
    sleeper = Sleeper(held, position, "q")
    asleep(held, "q")
    held.wake()
    assert sleeper.answer() is True
    mock.patch.stopall()


def test_a_nudge_wakes_the_watchers_of_its_prefix_only():
    _, held, position = caught_up(["a"], "")
    sleepers = {p: Sleeper(held, position, p) for p in ("x", "y")}
    spies = asleep(held, "x", "y")
    held.nudge("x")  # a client of a watcher of x went away
    held.nudge("z")  # nobody watches z: nothing to do
    assert (spies["x"].call_count, spies["y"].call_count) == (1, 0)
    assert sleepers["x"].answer() is True
    mock.patch.stopall()
    held.wake()
    assert sleepers["y"].answer() is True
