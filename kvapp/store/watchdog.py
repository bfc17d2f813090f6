"""Deadlines for PostgreSQL connections: no request waits on the database server for ever.

libpq waits for an answer with no time limit, and nothing the server
offers bounds every wait:
- statement_timeout ends a statement the server is running, but PostgreSQL
  turns it off before a transaction commits (finish_xact_command in
  src/backend/tcop/postgres.c), so it never covers the wait for a
  synchronous standby, and a frozen or unreachable server enforces nothing;
- tcp_user_timeout and keepalives notice a peer whose TCP stack stopped
  answering, not one whose kernel acknowledges every packet while the
  server process or its standby hangs.

So each database operation runs guarded by a Watchdog, one thread per
process that sleeps until the earliest deadline of the operations in
flight.  When a deadline passes:
1. it sends the server a cancel request (psycopg's cancel_safe, on a
   connection of its own): a running statement fails with 57014, and a
   COMMIT waiting for a synchronous standby returns, committed locally,
   with a WARNING (https://www.postgresql.org/docs/current/warm-standby.html
   #SYNCHRONOUS-REPLICATION-HA);
2. CANCEL_GRACE seconds later, if the operation still waits (the cancel
   could not reach the server), it shuts the connection's socket down:
   libpq's wait ends at once with a broken connection.
Either way the guard marks the operation as timed out, and the caller
closes the connection: a late cancel must not hit its next statement.

Cost: a guard takes one uncontended lock twice.  The thread wakes about
once per deadline while operations run, and not at all while none do.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import suppress

import psycopg

from kvapp.store.afterfork import renew_after_fork

# Seconds from the cancel request to the socket's shutdown: a cancel that
# reaches a live server is answered in milliseconds.
CANCEL_GRACE = 1.0

_NEVER = float("inf")


class Guard:
    """One operation on one connection, and what its watchdog did to it: a context manager."""

    __slots__ = (
        "watchdog", "conn", "started", "seconds", "due", "cancel_done", "timed_out", "done", "lock"
    )  # fmt: skip

    def __init__(
        self, watchdog: Watchdog, conn: psycopg.Connection, started: float, seconds: float
    ) -> None:
        self.watchdog = watchdog
        self.conn = conn
        self.started = started
        self.seconds = seconds  # the bound it got
        self.due = started + seconds
        self.cancel_done = False  # the cancel request was sent, or is not worth sending
        self.timed_out = False
        self.done = False
        # Made by the watchdog when it expires the guard, and held while it acts
        # on the connection; the operation's thread takes it to end, so a cancel
        # never reaches the connection's next user.
        self.lock: threading.Lock | None = None

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.watchdog._end(self)


class Watchdog:
    """Bounds the operations of one process's database connections; see the module."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._active: dict[int, Guard] = {}
        self._sleeping = True
        self._started = False  # the thread runs in this process (kvapp.store.afterfork)
        # The newest time an operation was answered: while none has been since
        # the oldest one in flight began, the server is silent.
        self._answered: float | None = None
        # When the oldest operation that timed out since then began.
        self._unanswered: float | None = None
        renew_after_fork(self)

    def _after_fork(self) -> None:
        """In a forked child: its thread and the parent's waiters do not exist here."""
        self._cond = threading.Condition(threading.Lock())
        self._active = {}
        self._sleeping = True
        self._started = False

    def guard(
        self, conn: psycopg.Connection, seconds: float, silent_seconds: float | None = None
    ) -> Guard:
        """Return the Guard to run a block with conn bounded to seconds (with guard(...) as g).

        While the server has been silent (see silent_for) for over
        silent_seconds, the bound is silent_seconds instead: a server that
        answers nobody gets no long wait from each new request.  The block
        sees the timeout as the psycopg error (or the warning) of the
        cancelled or broken connection; the caller reads guard.timed_out.
        Measured: about 2 us per guard.
        """
        now = time.monotonic()
        entry = Guard(self, conn, now, seconds)
        with self._cond:
            if not self._started:
                self._start()
            if (
                silent_seconds is not None
                and self._silent_for(now, silent_seconds) > silent_seconds
            ):
                # A server that answers nobody gets no cancel request either: it
                # could not answer that one.
                entry.seconds = min(seconds, silent_seconds)
                entry.due = now + entry.seconds
                entry.cancel_done = True
            self._active[id(entry)] = entry
            if self._sleeping:
                self._sleeping = False
                self._cond.notify()
        return entry

    def _end(self, entry: Guard) -> None:
        with self._cond:
            del self._active[id(entry)]
            lock = entry.lock  # made under _cond by _expire, if it expired
            if not entry.timed_out:
                self._answered = time.monotonic()
                self._unanswered = None
            elif self._unanswered is None:
                self._unanswered = entry.started
        if lock is not None:
            with lock:  # after a cancel or a cut in progress
                entry.done = True

    def silent_for(self) -> float:
        """Return how long the server has answered nothing while operations waited (0: it answers).

        An operation that timed out keeps the server silent until another one is answered.
        """
        with self._cond:
            return self._silent_for(time.monotonic())

    def _silent_for(self, now: float, floor: float = 0.0) -> float:
        """Return silent_for, or 0.0 when it is surely at most floor."""
        answered = self._answered
        if answered is not None and self._unanswered is None and now - answered <= floor:
            # An answer came since anything that waits longer than floor began:
            # a busy server's case, without a look at every operation.
            return 0.0
        oldest = min((entry.started for entry in self._active.values()), default=_NEVER)
        if self._unanswered is not None:
            oldest = min(oldest, self._unanswered)
        if oldest == _NEVER or (self._answered is not None and self._answered >= oldest):
            return 0.0
        return now - oldest

    def _start(self) -> None:
        # On first use, also in a forked child (after _after_fork).
        self._started = True
        self._sleeping = False
        threading.Thread(target=self._loop, name="kvapp-db-watchdog", daemon=True).start()

    def _loop(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for entry in list(self._active.values()):
                    if entry.due <= now:
                        self._expire(entry, now)
                due = min((e.due for e in self._active.values()), default=_NEVER)
                if due < _NEVER:
                    self._cond.wait(max(0.01, due - now))
                else:
                    self._sleeping = True  # until an operation begins
                    self._cond.wait()

    def _expire(self, entry: Guard, now: float) -> None:
        """Cancel, then (CANCEL_GRACE later, if still waiting) cut: called with _cond held."""
        entry.timed_out = True
        if entry.lock is None:
            entry.lock = threading.Lock()
        if not entry.cancel_done:
            entry.cancel_done = True
            entry.due = now + CANCEL_GRACE
            # Not on this thread: reaching an unreachable server takes CANCEL_GRACE.
            threading.Thread(target=_cancel, args=(entry,), daemon=True).start()
        else:
            entry.due = _NEVER  # nothing more to do but wait for the block to end
            threading.Thread(target=_cut, args=(entry,), daemon=True).start()


def _cancel(entry: Guard) -> None:
    assert entry.lock is not None
    with entry.lock:
        if not entry.done:
            with suppress(Exception):
                entry.conn.cancel_safe(timeout=CANCEL_GRACE)


def _cut(entry: Guard) -> None:
    """Shut the connection's socket down: libpq's wait sees the end of the stream at once."""
    assert entry.lock is not None
    with entry.lock:
        if entry.done:
            return
        with suppress(Exception):
            fd = os.dup(entry.conn.pgconn.socket)
            # shutdown acts on the socket, which the duplicate shares; close does not.
            with socket.socket(fileno=fd) as sock:
                sock.shutdown(socket.SHUT_RDWR)
