"""The feed: wakes this process's watchers when any process may have committed a change.

Readers of the change log (Store.history) learn from the feed when to look
again: the tail's refresher (kvapp.web.tail), a watch stream behind it, a
long-poll.  So a slow watcher never makes a writer wait.  A reader reads
feed.version, then reads the store, and if nothing new was there waits for
the version to move.  Every commit moves it after the commit, so a commit
the read missed always wakes the reader: no change waits for the next one.

What moves the version:
- a commit in this process: the store calls notify() after COMMIT;
- a commit in another process: while watchers wait, one listener thread
  calls the backend's listen(timeout), which returns True when another
  process may have committed (SQLite: a commit counter in the shared -gen
  file, read every 10 ms, kvapp.store.sqlite.LISTEN_POLL_SECONDS; PostgreSQL:
  LISTEN/NOTIFY);
- and once a second the listener compares the store's revision with the
  last it saw, which covers a writer killed between its COMMIT and its
  signal; its first check wakes the waiters once, which covers a commit
  made before the listener started listening.
The listener stops when no watcher has waited for LINGER_SECONDS, and then
calls the backend's idle() (PostgreSQL: UNLISTEN by closing its connection, or the server would
queue every later NOTIFY for a session that never reads them); with no
watcher the feed costs nothing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger("kvapp.watch")

# How often the listener compares the store's revision itself.
CHECK_SECONDS = 1.0
# How long close() waits for the listener: one listen() and one revision read.
CLOSE_SECONDS = 5.0
# How long the listener goes on after the last watcher stopped waiting.
# Watchers wait in turns (the tail's refresher reads the log between two
# waits): a listener that stopped at once restarted, with a new PostgreSQL
# session, at nearly every commit (63 sessions in 3 s under load).
LINGER_SECONDS = 5.0


class Feed:
    """A version number that moves after every commit, and the threads waiting for it to move."""

    def __init__(
        self,
        listen: Callable[[float], bool],
        revision: Callable[[], int],
        idle: Callable[[], None] = lambda: None,
    ) -> None:
        self._listen = listen
        self._revision = revision
        self._idle = idle
        self._changed = threading.Condition()
        self.version = 0
        self._waiting = 0
        self._listener: threading.Thread | None = None
        self._pid = 0
        self._closed = False

    def close(self, timeout: float = CLOSE_SECONDS) -> None:
        """Stop the listener, and wait for it up to timeout seconds; none starts again."""
        with self._changed:
            self._closed = True
            listener = self._listener if self._pid == os.getpid() else None
        if listener is not None and listener is not threading.current_thread():
            listener.join(timeout)

    def notify(self) -> None:
        """Wake every waiting watcher: a change may have been committed."""
        with self._changed:
            self.version += 1
            self._changed.notify_all()

    def wait(self, version: int, timeout: float) -> int:
        """Wait until the version is no longer version, or timeout seconds; return the version."""
        with self._changed:
            if self.version != version:
                return self.version
            self._waiting += 1
            try:
                self._start_listener()
                self._changed.wait_for(lambda: self.version != version, timeout)
            finally:
                self._waiting -= 1
            return self.version

    def _start_listener(self) -> None:
        """Start the listener unless it runs in this process (a fork inherits no thread)."""
        alive = self._listener is not None and self._listener.is_alive()
        if (alive and self._pid == os.getpid()) or self._closed:
            return
        self._pid = os.getpid()
        self._listener = threading.Thread(target=self._listen_loop, name="kvapp-feed", daemon=True)
        self._listener.start()

    def _listen_loop(self) -> None:
        while True:
            self._listen_while_waited_for()
            try:
                self._idle()  # outside the lock: notify() never waits for it
            except Exception as exc:
                log.warning("watchers' listener did not stop cleanly: %s", exc)
            with self._changed:
                if not self._waiting or self._closed:
                    self._listener = None
                    return
            # A watcher came while the listener stopped listening: listen again
            # (the first check wakes it, for a commit made in between).

    def _listen_while_waited_for(self) -> None:
        last: int | None = None
        checked: float | None = None
        waited = time.monotonic()
        while True:
            with self._changed:
                if self._closed:
                    return
                if self._waiting:
                    waited = time.monotonic()
                elif time.monotonic() - waited >= LINGER_SECONDS:
                    return
            try:
                changed = self._listen(CHECK_SECONDS / 4)
                if checked is None or time.monotonic() - checked >= CHECK_SECONDS:
                    checked = time.monotonic()
                    revision = self._revision()
                    # The first check wakes the waiters once: a commit made after
                    # a waiter read the store but before this listener listened
                    # (PostgreSQL's LISTEN hears only later NOTIFYs) is in this
                    # first revision, so no later check would see it move.
                    changed = changed or last is None or revision != last
                    last = revision
            except Exception as exc:  # a database that is down: look again later
                log.warning("watchers cannot look for changes now, will retry: %s", exc)
                time.sleep(CHECK_SECONDS)
                changed = True
            if changed:
                self.notify()
