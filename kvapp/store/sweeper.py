"""The background sweeper: removes expired keys' rows and old changes, a small batch at a time.

Reads never see an expired key (every query filters on expires_at), so
removing its row reclaims space and tells watchers, with an expiry event,
that the key is gone.  Changes older than watch_history_seconds, or beyond
the newest watch_history_max, leave the change log.  Each batch is one short
transaction found through an index (the partial index on expires_at, the
change log's primary key), never a full scan, and the write lock is released
between batches so requests are not held up behind it.
"""

from __future__ import annotations

import logging
import threading

from kvapp.store.base import StorageError, Store

log = logging.getLogger("kvapp.sweeper")

BATCH = 500
MAX_BATCHES_PER_SWEEP = 100


class Sweeper:
    """A daemon thread that calls sweep() every interval seconds."""

    def __init__(
        self,
        repository: Store,
        interval: float,
        history_seconds: int = 3600,
        history_max: int = 100_000,
    ) -> None:
        self.repository = repository
        self.interval = interval
        self.history_seconds = history_seconds
        self.history_max = history_max
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self) -> int:
        """Delete expired rows, then old changes, BATCH at a time; return how many expired rows.

        Each kind stops after MAX_BATCHES_PER_SWEEP batches; the next sweep goes on.
        """
        removed = 0
        for _ in range(MAX_BATCHES_PER_SWEEP):
            count = self.repository.purge_expired(BATCH)
            removed += count
            if count < BATCH:
                break
        for _ in range(MAX_BATCHES_PER_SWEEP):
            if self.repository.trim_history(self.history_seconds, self.history_max, BATCH) < BATCH:
                break
        return removed

    def start(self) -> None:
        """Start (or, in a forked child, restart) the thread; no thread if interval is 0."""
        if self.interval <= 0 or (self._thread is not None and self._thread.is_alive()):
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="kvapp-sweeper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                removed = self.sweep()
            except StorageError as exc:
                log.warning("expired keys not removed yet, will retry: %s", exc)
            except Exception:
                log.exception("sweeping expired keys failed")
            else:
                if removed:
                    log.info("removed %d expired keys", removed)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
