"""The read cache: recent answers of get() in process memory, checked against a shared file.

Why: every call into SQLite releases and retakes the GIL, and under load
each such handoff waits for the other threads; a read served from memory
makes none.  The cache must stay exact across worker processes and across
writes, so every hit is checked against a generation counter in a small
file that all kvapp processes on the database map into memory (mmap,
MAP_SHARED): one memory read per hit, no system call and no SQLite call.

The file, `<database>-gen`, holds SLOTS 64-bit counters; a key's slot is
crc32 of its UTF-8 bytes (the same in every process, unlike hash()).  After
them, one more counter, COMMITS, grows after every write transaction of any
process (W5): the watchers' feed looks at it to learn of other processes'
commits (kvapp.store.feed).

Writers (Generations.writing(), around every write transaction):
  W1  take the file's flock (every writing kvapp process; threads of one
      process are already serialised by the repository's write lock);
  W2  BEGIN IMMEDIATE, make the changes;
  W3  begin(keys): make each changed key's slot odd ("changing") and new:
      +1 if it was even, +2 if it was already odd;
  W4  COMMIT (or ROLLBACK);
  W5  end: +1 on those slots, even again;
  W6  release the flock; only then is any request acknowledged.
Readers (ReadCache.get and the repository's get):
  R1  on a hit, serve the entry only if its slot still holds the generation
      recorded with it, and its expiry (milliseconds) is still ahead;
  R2  on a miss, read the slot's generation g BEFORE the query;
  R3  query SQLite (a new read transaction: it sees every commit that
      finished before it started);
  R4  keep the row with g if g is even; never cache under an odd g.

Why a hit is never stale: say a write W of key k was acknowledged before a
read R that hits an entry E (generation g, filled by query Q).  If W's W3
happened before E's R2, then g even means W's W5 had run too (the slot is
odd from W3 to W5, and writers are serialised by the flock), so W
committed before R2 and Q saw it.  If W's W3 happened after R2, W changed
the slot to a new value, and since the flock makes every change a
serialised increment, counters only move forward: at R the slot no longer
holds g and R misses.  Either way R answers W's value or a later one.
Counters wrap around at 2**64 (a file left full of ones by damage would
otherwise stop every write): a slot comes back to g only after 2**64
increments, and since 2**64 is even, wrapping keeps each counter's parity.
Why the flock: SQLite's lock serialises W2 to W4 but is gone by W5, so
without it one writer's W5 (a read-modify-write) could interleave with the
next writer's W3 and store an older value over it; a later writer could
then bring the slot back to a value that a reader cached before it, and
that reader would serve a stale hit.
Races, each harmless:
  - an entry filled from an old snapshot under an old g, stored after a
    newer one: it fails its next check and is read again;
  - a torn 8-byte read (not on x86-64 or arm64, where aligned loads are
    atomic) can only yield a value that fails the check (a miss);
  - a writer killed between W3 and W5 leaves the slot odd: its keys are not
    cached until the next write of that slot makes it even again.  The
    kernel drops the dead writer's flock.
  - TTL: the entry keeps the expiry time and R1 checks it, so an expired
    key disappears at its deadline, cached or not.  The sweeper deletes only
    expired rows, which no reader can see, so it bumps nothing.
Outside the contract: another program writing the SQLite file directly
(the sqlite3 shell) bypasses the counters, so a kvapp process may keep
serving a cached value it replaced: stop kvapp first (or give every
process's SQLiteStore read_cache_bytes=0).  Deleting or replacing the -gen
file while kvapp runs is like deleting the -shm file: do not.

Memory: the cache is bounded by bytes (keys, values, content types and a
fixed overhead per entry), least recently used first out; it never grows
with the number of keys in the store.  Absent keys are cached too (a
miss is as costly as a hit), within the same bound.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from sys import getsizeof
from typing import Any

SLOTS = 8192  # 64 KiB of counters; a write of one key invalidates 1/SLOTS of the cache
_MASK = SLOTS - 1
_WRAP = 2**64 - 1  # counters are unsigned 64-bit: + is modulo 2**64 (see "Counters wrap")
COMMITS = SLOTS  # the index of the commit counter, in a page of its own after the slots
FILE_BYTES = SLOTS * 8 + 4096

# Python objects of one entry besides the key, value and content type: the
# entry tuple, its item tuple, two ints and the OrderedDict's node and slot
# (about 310 bytes measured with tracemalloc on CPython 3.11).
ENTRY_OVERHEAD = 400
# A value bigger than this share of the cache is read from SQLite every time.
MAX_ENTRY_SHARE = 16


MISS: Any = object()
"""What ReadCache.lookup returns when the cache cannot answer."""


class GenerationsUnavailable(Exception):
    """The -gen file cannot be created, sized or mapped; the message says why, advice what to do."""

    def __init__(self, message: str, advice: str = "check the folder's free space and permissions"):
        super().__init__(message)
        self.advice = advice


class LockTimeout(Exception):
    """Another process held the -gen file's lock past the timeout."""


def generations_path(database: str) -> str:
    return f"{database}-gen"


def slot_of(key: str) -> int:
    """Return the key's slot: the same number in every process."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) & _MASK


class Generations:
    """The shared counters: read by every get, changed around every write transaction."""

    def __init__(self, path: str, lock_timeout: float = 5.0) -> None:
        self.path = path
        self.lock_timeout = lock_timeout
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise GenerationsUnavailable(f"cannot open {path}: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size > FILE_BYTES:
                # Made with another slot count: processes would disagree on slots.
                # Its counters matter only while processes run (a new process
                # starts with an empty cache), so once none runs it can go.
                raise GenerationsUnavailable(
                    f"{path} is {size} bytes, not {FILE_BYTES}: made by another kvapp",
                    f"stop every kvapp process that uses this database, then delete {path}",
                )
            # Allocate the blocks now: a store into a sparse page of a full
            # disk would kill the process with SIGBUS later.
            if size < FILE_BYTES:
                os.posix_fallocate(fd, 0, FILE_BYTES)
            self._mmap = mmap.mmap(fd, FILE_BYTES, mmap.MAP_SHARED)
        except GenerationsUnavailable:
            os.close(fd)
            raise
        except (OSError, ValueError) as exc:
            os.close(fd)
            reason = getattr(exc, "strerror", None) or exc
            raise GenerationsUnavailable(f"cannot map {path}: {reason}") from None
        self._fd = fd
        self._locker: _Locker | None = None  # started when another process first holds the lock
        self.counters = memoryview(self._mmap).cast("Q")
        self._changing: set[int] = set()
        self._committing = False

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the writers' lock (W1) for a write transaction, and end (W5) what began in it.

        Callers serialise their own threads first (one writer per process at a time).
        """
        self._lock()
        try:
            yield
        finally:
            try:
                counters = self.counters
                for slot in self._changing:
                    counters[slot] = (counters[slot] + 1) & _WRAP
                self._changing.clear()
                if self._committing:
                    # A rolled-back transaction counts too: a watcher that
                    # wakes for nothing finds nothing new and waits again.
                    self._committing = False
                    counters[COMMITS] = (counters[COMMITS] + 1) & _WRAP
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def begin(self, keys: Iterable[str]) -> None:
        """Mark the keys' slots as changing (W3): call inside writing(), before COMMIT."""
        self._begin({slot_of(key) for key in keys})

    def committing(self) -> None:
        """Count this transaction in COMMITS when it ends: call inside writing()."""
        self._committing = True

    def commits(self) -> int:
        """Return the commit counter: it moves after every write transaction of any process."""
        return int(self.counters[COMMITS])

    def begin_all(self) -> None:
        """Mark every slot as changing: for bulk changes such as a load."""
        self._begin(set(range(SLOTS)))

    def _begin(self, slots: set[int]) -> None:
        counters = self.counters
        for slot in slots - self._changing:
            generation = counters[slot]
            counters[slot] = (generation + (1 if generation % 2 == 0 else 2)) & _WRAP
        self._changing |= slots

    def _lock(self) -> None:
        locker = self._locker
        if locker is not None and locker.pid != os.getpid():
            # The parent's thread is not in this process.  (A Generations
            # must still be opened after the fork: parent and child would share
            # its open file, and flock does not exclude them from each other.)
            locker = None
        # While the thread still waits for a lock a writer gave up on, its
        # flock is on this same open file: a LOCK_NB here would succeed
        # alongside it, and the thread would then unlock what this writer
        # holds.  Then only the thread may take the lock.
        if locker is None or locker.idle():
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
        # Held by another process for its transaction: wait for it, but give
        # up after lock_timeout as SQLite's busy handler would.
        if locker is None:
            locker = self._locker = _Locker(self._fd)
        if not locker.acquire(self.lock_timeout):
            raise LockTimeout(f"{self.path} stayed locked")

    def close(self) -> None:
        if self._fd < 0:
            return
        if self._locker is not None:
            self._locker.stop()
        self.counters.release()
        self._mmap.close()
        os.close(self._fd)
        self._fd = -1


class _Locker:
    """A thread that waits in flock(2) for this process's writer, which waits at most a timeout.

    flock has no timeout of its own.  Asking it again every 0.5 ms (LOCK_NB)
    left the lock free for about half that, plus the sleep's slack, each
    time it passed from one process to another; a thread blocked in flock
    is woken by the kernel as the holder unlocks.  Writers of one process
    are serialised before they get here, so one writer at most asks at a
    time.  A writer that gives up leaves the thread waiting: when it gets
    the lock it unlocks it at once, unless a writer has asked again since.
    The thread locks through its own duplicate of the descriptor (a flock
    belongs to the open file, which both share), so that close() cannot pull
    a descriptor from under its flock call.  For the same reason nothing else
    may flock that open file while the thread waits: a LOCK_NB would succeed
    beside it (Generations._lock asks idle() first).
    """

    _IDLE, _ASKED, _GOT, _GIVEN_UP = range(4)

    def __init__(self, fd: int) -> None:
        self.pid = os.getpid()
        self._fd = os.dup(fd)
        self._state = self._IDLE
        # Apart from _state, so that a writer giving up cannot overwrite it.
        self._stopping = False
        self._changed = threading.Condition(threading.Lock())
        self.thread = threading.Thread(target=self._run, name="kvapp-gen-lock", daemon=True)
        self.thread.start()

    def idle(self) -> bool:
        """Whether the thread neither waits for the lock nor holds one given up on."""
        with self._changed:
            return self._state == self._IDLE

    def acquire(self, timeout: float) -> bool:
        """Return True once this process holds the lock, False after timeout seconds without."""
        with self._changed:
            self._state = self._ASKED
            self._changed.notify_all()
            if self._changed.wait_for(lambda: self._state == self._GOT, timeout):
                self._state = self._IDLE
                return True
            self._state = self._GIVEN_UP
            return False

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()

    def _run(self) -> None:
        try:
            while True:
                with self._changed:
                    self._changed.wait_for(lambda: self._state == self._ASKED or self._stopping)
                    if self._state != self._ASKED:
                        return
                fcntl.flock(self._fd, fcntl.LOCK_EX)
                with self._changed:
                    if self._state == self._ASKED:
                        self._state = self._GOT
                        self._changed.notify_all()
                    else:
                        # Given up on: not this process's to hold.  Unlocked
                        # before IDLE lets a writer try LOCK_NB again.
                        fcntl.flock(self._fd, fcntl.LOCK_UN)
                        self._state = self._IDLE
        finally:
            os.close(self._fd)


class ReadCache:
    """Entries (item, expires_at_ms, slot, generation, size) by key, at most max_bytes of them.

    get() and store() may be called from any thread; store() and eviction
    take a lock, hits do not.
    """

    def __init__(self, generations: Generations, max_bytes: int) -> None:
        self.generations = generations
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_bytes // MAX_ENTRY_SHARE
        self.bytes = 0
        self._counters = generations.counters
        self._entries: OrderedDict[str, tuple[Any, int | None, int, int, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: str, now: int) -> Any:
        """Return the cached item of key, None if it is absent or expired at now, or MISS (R1)."""
        entry = self._entries.get(key)
        if entry is None or self._counters[entry[2]] != entry[3]:
            return MISS
        try:
            self._entries.move_to_end(key)
        except KeyError:  # evicted by another thread meanwhile; the entry is still right
            pass
        expires_at = entry[1]
        if expires_at is not None and expires_at <= now:
            return None
        return entry[0]

    def before_query(self, key: str) -> tuple[int, int]:
        """Return (slot, generation) to pass to store() after the query (R2)."""
        slot = slot_of(key)
        return slot, self._counters[slot]

    def store(
        self, key: str, item: Any, expires_at: int | None, slot: int, generation: int
    ) -> None:
        """Keep what a query read for key (R4); item None means absent."""
        if generation % 2 or not self.max_bytes:
            return
        size = ENTRY_OVERHEAD + getsizeof(key)
        if item is not None:
            size += getsizeof(item[0]) + getsizeof(item[1])
        if size > self.max_entry_bytes:
            return
        entries = self._entries
        with self._lock:
            old = entries.pop(key, None)
            if old is not None:
                self.bytes -= old[4]
            entries[key] = (item, expires_at, slot, generation, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                self.bytes -= entries.popitem(last=False)[1][4]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0
