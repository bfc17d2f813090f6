"""The watchdog and group commit's monitor keep working in a forked worker.

Both own a thread, asleep on a Condition when the process forks.  In the
child that thread does not exist, but the Condition still lists it as a
waiter: a notify would wake nobody, and no deadline would be enforced.
Each test forks after the parent used the object, then checks in the
child that a deadline still fires.  Deadlines are waited for as states,
bounded; no assertion is about time.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from kvapp.store.base import Outcome, Put, Write
from kvapp.store.groupcommit import GroupCommit
from kvapp.store.watchdog import CANCEL_GRACE, Watchdog

WAIT_S = 10


class Connection:
    """Stands for a psycopg connection: the watchdog's cancel and cut fail on it, quietly."""


def eventually(condition, timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def in_a_child(check) -> None:
    """Run check() in a forked child; fail unless it returns True there."""
    pid = os.fork()
    if pid == 0:
        try:
            code = 0 if check() else 1
        except BaseException:
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_the_watchdog_enforces_deadlines_in_a_forked_child():
    watchdog = Watchdog()
    idle = CANCEL_GRACE + 0.5  # the thread is done with a guard, and sleeps until the next
    with watchdog.guard(Connection(), 0.05) as guard:  # the parent's thread runs
        assert eventually(lambda: guard.timed_out)
    time.sleep(idle)

    def check() -> bool:
        results = []
        for _ in range(2):  # the second guard must wake the child's thread from its sleep
            with watchdog.guard(Connection(), 0.05) as guard:
                results.append(eventually(lambda: guard.timed_out, 0.05 + CANCEL_GRACE + 5))
            time.sleep(idle)
        return results == [True, True]

    in_a_child(check)


def test_group_commit_gives_up_on_a_stalled_batch_in_a_forked_child():
    release = threading.Event()

    def apply(writes):
        if writes[0].changes[0].key == "hang":
            release.wait(WAIT_S)
        return [Outcome(1, (False,)) for _ in writes]

    group = GroupCommit(apply, stalled_after=0.2, stalled=lambda age, in_batch: TimeoutError())
    assert group.submit(Write.of(Put("parent", b"v", "text/plain"))) == Outcome(1, (False,))
    time.sleep(0.5)  # the parent's monitor thread sleeps on its Condition

    def check() -> bool:
        # A first batch starts the child's monitor, which then sleeps until the next one.
        assert group.submit(Write.of(Put("child", b"v", "text/plain"))) == Outcome(1, (False,))
        time.sleep(0.5)
        leader = threading.Thread(
            target=group.submit, args=(Write.of(Put("hang", b"v", "text/plain")),), daemon=True
        )
        leader.start()
        assert eventually(lambda: group.stalled_for() > 0)
        with pytest.raises(TimeoutError):  # queued behind the stalled batch: given up
            group.submit(Write.of(Put("behind", b"v", "text/plain")))
        release.set()
        leader.join(WAIT_S)
        return not leader.is_alive()

    in_a_child(check)
