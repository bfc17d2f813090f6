"""The tail: the newest changes, read from the change log once for every watcher of a process.

Without it each watcher queried the change log after every commit: with 50
watchers following a busy store, that was 50 queries per commit, and
durable SETs fell to 0.13 of their rate without watchers
(bench/results/20261206-224810-watch.md).  Here one thread per process, the
refresher, reads each new change once, encodes it as its Server-Sent Event
once, and keeps the newest ones in memory; a watcher that has caught up
takes its events from here, filtered by its prefix, and waits for a
change under that prefix.  The refresher reads at most every REFRESH_SECONDS,
so under load one query serves many commits and every watcher.

It is a cache of the change log, not a queue: it holds every change
between its start and its end positions, no watcher waits for it to be
read, and a watcher whose position is before its start (resuming from far
back, or fallen behind) reads the change log itself.  It keeps at most
MAX_EVENTS changes and MAX_BYTES of encoded events (each counted twice: it
is held alone and in its segment), the oldest going first.

Each read of the change log adds one segment: its events' bytes joined
once, and the prefix its keys share.  A watcher whose prefix covers a
segment's keys (every watcher of all keys; a watcher of "users/" while only
users/ keys change) takes the segment whole, with no work per change: with
50 watchers of a busy store, filtering and joining each change for each
watcher was about half of what the streams cost (py-spy, docs/performance.md).
When the history floor passes its start (a load, or trimming by age or
count), it starts again empty at the store's revision.  The refresher runs
while the process has watchers.

A watcher that has caught up waits for a change under its own prefix, not
for any read of the log: the refresher wakes the watchers of a prefix only
when a read brought a key under it (and every watcher when the tail starts
again).  Woken at every read, 50 watchers of a prefix nobody wrote cost
writes to other keys 0.86 of their rate with 2 workers: each read woke 25
threads per process to find nothing (docs/performance.md).
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from kvapp.store.base import WHOLE, Event, StorageError, Store

log = logging.getLogger("kvapp.watch")

MAX_EVENTS = 10_000
# Each change is counted twice (it is held alone and in its segment's blob).
MAX_BYTES = 16 * 1024 * 1024
# Changes read from the change log per query (here and by a watcher behind
# the tail): a watcher far behind catches up a page at a time.
PAGE = 1000
# The least time between two reads of the change log by the refresher.
REFRESH_SECONDS = 0.02
# How long the refresher waits on the feed before it looks whether it still has watchers.
IDLE_SECONDS = 1.0

Position = tuple[int, int]


class _Segment(NamedTuple):
    """The events one read of the change log added, numbered from the tail's (re)start."""

    start: int  # the number of its first event
    end: int  # the number after its last
    keys_prefix: str  # the longest prefix all its keys share
    blob: bytes  # its encoded events, joined


class _Waiting:
    """The watchers of one prefix that have read all the tail holds for them, asleep."""

    __slots__ = ("woken", "count")

    def __init__(self, lock: threading.Lock) -> None:
        self.woken = threading.Condition(lock)
        self.count = 0


class Tail:
    """The newest changes as encoded events, each with its position and key."""

    def __init__(self, repository: Store, encode: Callable[[Event], bytes]) -> None:
        self.repository = repository
        self.encode = encode
        self._lock = threading.Lock()
        self._waiting: dict[str, _Waiting] = {}  # by prefix
        self._positions: list[Position] = []
        self._events: list[tuple[str, bytes]] = []  # (key, encoded event)
        self._bytes = 0
        self._base = 0  # the number of _events[0] (the ones before it were dropped)
        self._segments: list[_Segment] = []
        self._segment_ends: list[int] = []
        self._start: Position | None = None  # every change after it, up to _end, is held
        self._end: Position = (0, WHOLE)
        self._stopped = False  # wake() was called: no watcher sleeps any more
        self._users = 0
        self._refresher: threading.Thread | None = None
        self._pid = 0

    # -- watchers --------------------------------------------------------------

    def attach(self) -> None:
        """A watcher starts: the refresher runs while there is one."""
        with self._lock:
            self._users += 1
            alive = self._refresher is not None and self._refresher.is_alive()
            if not alive or self._pid != os.getpid():
                self._pid = os.getpid()
                self._refresher = threading.Thread(
                    target=self._refresh_loop, name="kvapp-tail", daemon=True
                )
                self._refresher.start()

    def detach(self) -> None:
        with self._lock:
            self._users -= 1

    def join(self, timeout: float) -> None:
        """Wait for the refresher to end, after wake(): its reads must end before the store's."""
        with self._lock:
            refresher = self._refresher
        if refresher is not None and refresher is not threading.current_thread():
            refresher.join(timeout)

    def read(self, position: Position, prefix: str) -> tuple[list[bytes], int, Position] | None:
        """Return the encoded events after position under prefix, and how many, and where they end.

        None when position is before the tail's start (or there is no tail
        yet): read the change log instead.
        """
        with self._lock:
            if self._start is None or position < self._start:
                return None
            first = self._base + bisect.bisect_right(self._positions, position)
            chunks: list[bytes] = []
            count = 0
            for segment in self._segments[bisect.bisect_right(self._segment_ends, first) :]:
                if segment.start >= first and segment.keys_prefix.startswith(prefix):
                    chunks.append(segment.blob)
                    count += segment.end - segment.start
                    continue
                base = self._base
                events = self._events[max(segment.start, first) - base : segment.end - base]
                picked = [chunk for key, chunk in events if key.startswith(prefix)]
                chunks += picked
                count += len(picked)
            return chunks, count, max(position, self._end)

    def wait(self, position: Position, prefix: str, timeout: float) -> bool:
        """Wait until the tail may hold a change under prefix after position; False: timeout.

        position is where the watcher's last read() left it.  True at once
        if the tail moved since that read (read again, even if nothing of
        the move was under prefix); else when a read of the log brings a key
        under prefix, the tail starts again, or wake() is called.
        """
        with self._lock:
            # _stopped under the lock: a stream that saw the server still running
            # but comes here after wake() must not sleep through the shutdown.
            moved = self._start is None or position < self._start or self._end > position
            if moved or self._stopped:
                return True
            waiting = self._waiting.get(prefix)
            if waiting is None:
                waiting = self._waiting[prefix] = _Waiting(self._lock)
            waiting.count += 1
            try:
                return waiting.woken.wait(timeout)
            finally:
                waiting.count -= 1
                if not waiting.count:
                    del self._waiting[prefix]

    def nudge(self, prefix: str) -> None:
        """Wake the watchers of prefix (one of them may have lost its client)."""
        with self._lock:
            waiting = self._waiting.get(prefix)
            if waiting is not None:
                waiting.woken.notify_all()

    def wake(self) -> None:
        """Wake every waiting watcher, and let none sleep again (the server stops)."""
        with self._lock:
            self._stopped = True
            self._wake(None)

    def _wake(self, segment: _Segment | None) -> None:
        """Wake the watchers of the prefixes under which segment has a key; None: every one."""
        rest: dict[str, _Waiting] = {}
        for prefix, waiting in self._waiting.items():
            if segment is None or segment.keys_prefix.startswith(prefix):
                waiting.woken.notify_all()
            else:
                rest[prefix] = waiting
        if not rest:
            return
        assert segment is not None
        # Each key against the waiting prefixes of each length: a dict lookup
        # per key and length, not a startswith per key and prefix.
        lengths = sorted({len(prefix) for prefix in rest})
        base = self._base
        for key, _ in self._events[segment.start - base : segment.end - base]:
            for length in lengths:
                woken = rest.pop(key[:length], None)
                if woken is not None:
                    woken.woken.notify_all()
            if not rest:
                return

    # -- the refresher -----------------------------------------------------------

    def _refresh_loop(self) -> None:
        feed = self.repository.feed
        while True:
            with self._lock:
                if not self._users or self._stopped:
                    self._refresher = None
                    return
            # The version first: a commit after the query moves the feed again.
            version = feed.version
            try:
                self._refresh()
            except StorageError as exc:
                log.warning("watchers get no changes now, will retry: %s", exc)
                feed.wait(version, IDLE_SECONDS)
                continue
            # Let commits gather: one read of the log for all of them.  Before
            # the wait, so that the first commit after a quiet spell goes out at once.
            time.sleep(REFRESH_SECONDS)
            feed.wait(version, IDLE_SECONDS)

    def _refresh(self) -> None:
        """Read what the change log holds after the tail's end; add it, then wake the watchers."""
        while True:
            start = self._start
            history = self.repository.history(self._end, "", 0 if start is None else PAGE)
            encoded = [self.encode(event) for event in history.events]
            with self._lock:
                if start is None or history.floor > start[0]:
                    self._clear((history.revision, WHOLE))
                    self._wake(None)
                else:
                    segment = self._add(history.events, encoded)
                    self._end = self._positions[-1] if history.cut else (history.revision, WHOLE)
                    if segment is not None:
                        self._wake(segment)  # before _shrink, which may rebuild it
                    self._shrink()
            if start is None or not history.cut:
                return

    def _add(self, events: list[Event], encoded: list[bytes]) -> _Segment | None:
        """Append events, encoded, as one segment; return it (None: no events)."""
        if not events:
            return None
        start = self._base + len(self._events)
        self._positions += [(event.revision, event.n) for event in events]
        self._events += [(event.key, chunk) for event, chunk in zip(events, encoded, strict=True)]
        blob = b"".join(encoded)
        # Each change's bytes are held twice, alone and in its segment's blob.
        self._bytes += 2 * len(blob)
        keys_prefix = os.path.commonprefix([event.key for event in events])
        segment = _Segment(start, start + len(events), keys_prefix, blob)
        self._segments.append(segment)
        self._segment_ends.append(start + len(events))
        return segment

    def _clear(self, position: Position) -> None:
        self._positions, self._events, self._bytes = [], [], 0
        self._base, self._segments, self._segment_ends = 0, [], []
        self._start = self._end = position

    def _shrink(self) -> None:
        """Drop the oldest events beyond MAX_EVENTS or MAX_BYTES (a quarter more at once)."""
        if len(self._events) <= MAX_EVENTS and self._bytes <= MAX_BYTES:
            return
        drop = 0
        kept_bytes = self._bytes
        while drop < len(self._events) and (
            len(self._events) - drop > MAX_EVENTS * 3 // 4 or kept_bytes > MAX_BYTES * 3 // 4
        ):
            kept_bytes -= 2 * len(self._events[drop][1])
            drop += 1
        self._start = self._positions[drop - 1]
        del self._positions[:drop], self._events[:drop]
        self._bytes = kept_bytes
        self._base += drop
        gone = bisect.bisect_right(self._segment_ends, self._base)
        del self._segments[:gone], self._segment_ends[:gone]
        if self._segments and self._segments[0].start < self._base:
            # Dropped in part: its blob shrinks to the events left, so that
            # no dropped event's bytes stay held (MAX_BYTES is a real bound).
            end = self._segments[0].end
            left = self._events[: end - self._base]
            keys_prefix = os.path.commonprefix([key for key, _ in left])
            blob = b"".join(chunk for _, chunk in left)
            self._segments[0] = _Segment(self._base, end, keys_prefix, blob)
