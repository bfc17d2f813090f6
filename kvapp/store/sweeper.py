"""The background sweeper: removes the rows of expired keys, a small batch at a time.

Reads never see an expired key (every query filters on expires_at), so the
sweeper only reclaims space.  Each batch is one short transaction found
through the partial index on expires_at, never a full scan, and the write
lock is released between batches so requests are not held up behind it.
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

    def __init__(self, repository: Store, interval: float) -> None:
        self.repository = repository
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self) -> int:
        """Delete expired rows, BATCH at a time, up to MAX_BATCHES_PER_SWEEP; return how many."""
        removed = 0
        for _ in range(MAX_BATCHES_PER_SWEEP):
            count = self.repository.purge_expired(BATCH)
            removed += count
            if count < BATCH:
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
