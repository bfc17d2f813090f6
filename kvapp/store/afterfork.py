"""Objects that own a thread and a Condition, made fit to use again in a forked child.

In the child only the forking thread exists, but a Condition inherited from
the parent still lists the parent's sleeping threads as waiters: notify()
would wake one of them, that is nobody.  A lock another thread held at the
fork stays held for ever.  Each registered object's _after_fork() makes
them anew; it runs in the child before anything else can use them
(os.register_at_fork).
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol


class Renewable(Protocol):
    def _after_fork(self) -> None: ...


_instances: weakref.WeakSet[Renewable] = weakref.WeakSet()


def renew_after_fork(instance: Renewable) -> None:
    """Call instance._after_fork() in every child this process forks from now on."""
    _instances.add(instance)


def _renew() -> None:
    for instance in list(_instances):
        instance._after_fork()


os.register_at_fork(after_in_child=_renew)
