"""Group commit: the Writes of many threads share one transaction and one fsync.

Any storage with an `apply_batch(writes) -> results` that applies its writes
in one transaction (every backend of kvapp.store)
gets group commit by sending every write through GroupCommit.submit().

Leader and followers, no committer thread and no timer:
- A thread that submits while no batch is being applied becomes the leader:
  it applies at once the writes waiting then (a lone write: just its own),
  so an idle server never waits to fill a batch.
- A thread that submits while a batch is being applied waits; its write
  joins the next batch, together with every other write that arrived during
  that commit.  The first of them becomes the next leader when the current
  batch is done.  So the batch size follows the load: about one commit per
  fsync, however many threads write.
- Every submitter is woken only after apply_batch has returned (the batch
  is durable) or raised (nothing of it is): nothing is acknowledged early.
  Each gets its own result, an Outcome, a ConditionFailed or a
  ReadsTooLarge (apply_batch fails such a write alone), or the error that
  failed the whole batch, which then reaches every request of it.
With no committer thread of its own, it works unchanged in forked worker
processes.

A batch that the database does not answer (a PostgreSQL server cut off by
the network, a synchronous standby that is gone, a disk that hangs) would
hold the thread of every write in it or queued behind it, perhaps every
thread of the server.  With stalled_after set, once the batch being applied
is older than that, every write but the leader's stops waiting, and its
thread goes back to serve reads:
- a write still queued, and every new one, fails with stalled(age, False):
  nothing of it is stored;
- a write in the stalled batch fails with stalled(age, True): the batch
  may still commit, so its outcome is unknown.
Only the leader's thread, inside apply_batch, waits for the database.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from kvapp.store.afterfork import renew_after_fork
from kvapp.store.base import ConditionFailed, Outcome, Put, ReadsTooLarge, Result, Write

ApplyBatch = Callable[[Sequence[Write]], Sequence[Result]]

# A batch stops growing at whichever comes first.  The first write always
# goes, however big: the caps bound how long one transaction holds the write
# lock and how much it buffers, they never refuse a write.
MAX_BATCH_WRITES = 256
MAX_BATCH_BYTES = 8 * 1024 * 1024


class BatchInterrupted(RuntimeError):
    """The leader applying this write's batch was interrupted (KeyboardInterrupt, SystemExit)."""


class _Waiter:
    """One submitted write, and the lock its thread sleeps on until it is answered or leads."""

    __slots__ = ("write", "size", "wake", "leads", "done", "result", "error")

    def __init__(self, write: Write, size: int) -> None:
        self.write = write
        self.size = size
        self.wake = threading.Lock()
        self.wake.acquire()
        self.leads = False
        self.done = False  # answered: by its batch's leader, or given up on by the monitor
        self.result: Result | None = None
        self.error: BaseException | None = None


def write_size(write: Write) -> int:
    """Return about how many bytes a write carries: its keys and values.

    A Write that reads may answer up to its read_limit of values, which the
    batch holds in memory until it commits: that counts too.
    """
    carried = sum(
        len(change.key) + (len(change.value) if isinstance(change, Put) else 0)
        for branch in write.branches()
        for change in branch.changes
    )
    if write.read_limit and write.read_keys():
        carried += write.read_limit
    return carried


class GroupCommit:
    """Submits Writes from many threads to apply_batch, as few batches as possible."""

    def __init__(
        self,
        apply_batch: ApplyBatch,
        max_writes: int = MAX_BATCH_WRITES,
        max_bytes: int = MAX_BATCH_BYTES,
        stalled_after: float | None = None,
        stalled: Callable[[float, bool], Exception] | None = None,
        is_stalled: Callable[[float], bool] | None = None,
    ) -> None:
        if max_writes < 1:
            raise ValueError("max_writes must be at least 1")
        if (stalled_after is None) != (stalled is None):
            raise ValueError("stalled_after and stalled go together")
        self.apply_batch = apply_batch
        self.max_writes = max_writes
        self.max_bytes = max_bytes
        self.stalled_after = stalled_after
        self.stalled = stalled
        # Asked once a batch is older than stalled_after, with its age; None: it is stalled.
        self.is_stalled = is_stalled
        self._mutex = threading.Lock()
        self._queue: deque[_Waiter] = deque()
        self._busy = False  # a leader is applying a batch, or has been chosen to
        self._batch: list[_Waiter] = []  # the one being applied
        self._applying_since: float | None = None  # time.monotonic() the batch began
        self._stalled = False  # the monitor gave up on the batch being applied
        # The monitor: a thread per process (kvapp.store.afterfork), started
        # with the first batch, asleep while no batch is applied, awake about
        # once per stalled_after while batches are.  Followers block on their
        # own lock, with no timer.
        self._changed = threading.Condition(self._mutex)
        self._monitor_started = False
        self._monitor_idle = False
        self._closed = False
        renew_after_fork(self)

    def close(self) -> None:
        """End the monitor thread: the store is closing, and applies no batch any more."""
        with self._changed:
            self._closed = True
            self._changed.notify()

    def stalled_for(self) -> float:
        """Return how long the batch being applied has been applied for (0: none is)."""
        since = self._applying_since
        return 0.0 if since is None else time.monotonic() - since

    def stalled_now(self) -> bool:
        """Return True while the monitor has given up on the batch being applied."""
        return self._stalled

    def submit(self, write: Write) -> Outcome:
        """Apply write in the next batch; return its Outcome once that batch is durable.

        Raises ConditionFailed if its condition does not hold (nothing of it is
        applied), ValueError if it changes a key twice (before it joins a
        batch), or whatever failed its whole batch.
        """
        if write.otherwise is not None and (write.otherwise.checks or write.otherwise.otherwise):
            raise ValueError("an otherwise has changes and reads only")
        for branch in write.branches():
            changes = branch.changes
            if len(changes) > 1 and len({change.key for change in changes}) != len(changes):
                raise ValueError("a Write changes each key at most once")
        waiter = _Waiter(write, write_size(write))
        with self._mutex:
            if self._stalled:
                assert self.stalled is not None
                raise self.stalled(self.stalled_for(), False)
            self._queue.append(waiter)
            leads = not self._busy
            self._busy = True
        if not leads:
            waiter.wake.acquire()  # until our batch is done, or we are the next leader
            leads = waiter.leads
        if leads:
            self._lead()
        if waiter.error is not None:
            raise waiter.error
        if isinstance(waiter.result, ConditionFailed | ReadsTooLarge):
            raise waiter.result
        assert waiter.result is not None
        return waiter.result

    def _after_fork(self) -> None:
        """In a forked child: no thread of the parent runs here, and its locks may be held."""
        self._mutex = threading.Lock()
        self._changed = threading.Condition(self._mutex)
        self._queue.clear()
        self._busy = False
        self._batch = []
        self._applying_since = None
        self._stalled = False
        self._monitor_started = False
        self._monitor_idle = False

    def _monitor(self, stalled_after: float) -> None:
        """Give up on the writes of a batch older than stalled_after, but its leader's."""
        with self._changed:
            while not self._closed:
                since = self._applying_since
                if since is None or self._stalled:
                    self._monitor_idle = True
                    self._changed.wait()  # until the next batch
                    continue
                age = time.monotonic() - since
                if age <= stalled_after:
                    self._changed.wait(stalled_after - age + 0.001)
                    continue
                if self.is_stalled is not None and not self.is_stalled(age):
                    self._changed.wait(stalled_after / 4)  # ask again soon
                    continue
                assert self.stalled is not None
                self._stalled = True
                given_up = [(w, False) for w in self._queue] + [
                    (w, True) for w in self._batch[1:] if not w.done
                ]
                self._queue.clear()
                for waiter, in_batch in given_up:
                    waiter.done = True
                    waiter.error = self.stalled(age, in_batch)
                    waiter.wake.release()

    def _take(self) -> list[_Waiter]:
        """Return the waiting writes of the next batch, oldest first, within the caps."""
        batch: list[_Waiter] = []
        size = 0
        with self._mutex:
            queue = self._queue
            while queue and len(batch) < self.max_writes:
                if batch and size + queue[0].size > self.max_bytes:
                    break
                waiter = queue.popleft()
                size += waiter.size
                batch.append(waiter)
            self._batch = batch
            self._applying_since = time.monotonic()
            if self.stalled_after is not None:
                if not self._monitor_started:  # the first batch, also of a forked child
                    self._monitor_started = True
                    threading.Thread(
                        target=self._monitor,
                        args=(self.stalled_after,),
                        name="kvapp-group-commit-monitor",
                        daemon=True,
                    ).start()
                elif self._monitor_idle:
                    self._monitor_idle = False
                    self._changed.notify()
        return batch

    def _lead(self) -> None:
        """Apply one batch (it holds the leader's own write: a leader is first in the queue)."""
        batch = self._take()
        error: BaseException | None = None
        try:
            results = self.apply_batch([waiter.write for waiter in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"apply_batch returned {len(results)} results for {len(batch)}")
            for waiter, result in zip(batch, results, strict=True):
                waiter.result = result
        except BaseException as exc:  # every request of the batch must hear of it
            error = exc
        finally:
            with self._mutex:
                self._applying_since = None
                self._batch = []
                self._stalled = False
                successor = self._queue[0] if self._queue else None
                if successor is None:
                    self._busy = False
                else:
                    successor.leads = True
                followers = [waiter for waiter in batch[1:] if not waiter.done]
                for waiter in followers:
                    waiter.done = True  # the monitor no longer gives up on them
            # The next leader first: its commit can start while the others answer.
            if successor is not None:
                successor.wake.release()
            if error is not None:
                batch[0].error = error
            for waiter in followers:
                if error is not None:
                    waiter.error = _own_copy(error)
                waiter.wake.release()


def _own_copy(exc: BaseException) -> BaseException:
    """Return an exception for one follower to raise, chained to the leader's original.

    Each thread raises its own instance so that tracebacks do not mix;
    KeyboardInterrupt and SystemExit stop only the leader's thread.
    """
    if not isinstance(exc, Exception):
        clone: BaseException = BatchInterrupted("the batch holding this write was interrupted")
    else:
        try:
            clone = copy.copy(exc)
        except Exception:
            return exc
    clone.__cause__ = exc
    return clone
