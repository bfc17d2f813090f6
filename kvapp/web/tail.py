"""The tail: the newest changes, read from the change log once for every watcher of a process.

Without it each watcher queried the change log after every commit: with 50
watchers following a busy store, that was 50 queries per commit, and
durable SETs fell to 0.13 of their rate without watchers (docs/performance.md).
The tail reads each new change once, encodes it as its Server-Sent Event
once, and keeps the newest ones in memory, so a watcher that has caught up
takes its events from here, filtered by its prefix.

It is a cache of the change log, not a queue: it holds every change
between its start and its end positions, no watcher waits for it to be
read, and a watcher whose position is before its start (resuming from far
back, or fallen behind) reads the change log itself, as before.  It keeps
at most MAX_EVENTS changes and MAX_BYTES of encoded events, the oldest
going first.  When the history floor passes its start (a load, or trimming
by age or count), it starts again empty at the store's revision.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable

from kvapp.store.base import WHOLE, Event, Store

MAX_EVENTS = 10_000
MAX_BYTES = 8 * 1024 * 1024
# Changes read from the change log per query (here and by a watcher behind
# the tail): a watcher far behind catches up a page, one write, at a time.
PAGE = 1000

Position = tuple[int, int]


class Tail:
    """The newest changes as encoded events, each with its position and key."""

    def __init__(self, repository: Store, encode: Callable[[Event], bytes]) -> None:
        self.repository = repository
        self.encode = encode
        self._lock = threading.Lock()
        self._positions: list[Position] = []
        self._events: list[tuple[str, bytes]] = []  # (key, encoded event)
        self._bytes = 0
        self._start: Position | None = None  # every change after it, up to _end, is held
        self._end: Position = (0, WHOLE)
        self._version = -1  # the feed's version when the tail was last brought up to date

    def read(
        self, position: Position, prefix: str, version: int
    ) -> tuple[list[bytes], Position, bool] | None:
        """Return the encoded events after position under prefix, the position they reach, False.

        (False: no more follow; the change log's pages answer True when they do.)

        version: the feed's version, read before this call; the tail first
        reads the change log if it has moved since.  None when position is
        before the tail's start: read the change log instead.  May raise
        StorageError.
        """
        with self._lock:
            if version != self._version:
                self._refresh(version)
            if self._start is None or position < self._start:
                return None
            first = bisect.bisect_right(self._positions, position)
            chunks = [chunk for key, chunk in self._events[first:] if key.startswith(prefix)]
            return chunks, max(position, self._end), False

    def _refresh(self, version: int) -> None:
        # The version first: a commit after the query moves the feed again.
        self._version = version
        while True:
            history = self.repository.history(self._end, "", 0 if self._start is None else PAGE)
            if self._start is None or history.floor > self._start[0]:
                self._clear((history.revision, WHOLE))
                return
            for event in history.events:
                chunk = self.encode(event)
                self._positions.append((event.revision, event.n))
                self._events.append((event.key, chunk))
                self._bytes += len(chunk)
            if len(history.events) < PAGE:
                self._end = (history.revision, WHOLE)
                break
            self._end = self._positions[-1]
        self._shrink()

    def _clear(self, position: Position) -> None:
        self._positions, self._events, self._bytes = [], [], 0
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
            kept_bytes -= len(self._events[drop][1])
            drop += 1
        self._start = self._positions[drop - 1]
        del self._positions[:drop], self._events[:drop]
        self._bytes = kept_bytes
