"""kvapp with a stand-in for its commit: how fast could durable SETs be if committing were free?

`granian --interface wsgi bench.standin:app` serves kvapp's own app, as
`wsgi:app` would (config.ini, decoding, the access log, request metrics,
group commit), with one change: the store's apply_batch, which group
commit's leader calls with each batch, is replaced, and with it the
transaction, planning, commit metrics and the watchers' feed.  BENCH_COMMIT_SECONDS says
by what (not a KVAPP_ variable: kvapp refuses names it does not know):

- a number of seconds (default 0.0003: a batch applied alone takes about
  0.2 ms, and 0.3 ms allows for handing it to another process):
  sleep that long, which releases the GIL as waiting for a commit made by
  another process would, then answer every write of the batch as applied;
- "none": answer at once, without releasing the GIL.

Nothing is stored.  Side by side with bench.hello and wsgi:app under the same
granian and wrk's set-unique script, it bounds what any faster commit path
(another process, another language) could give: docs/performance.md,
"Durable writes on granian".
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Sequence

from kvapp.store.base import Outcome, Write
from wsgi import app

_revisions = itertools.count(1)


def _stand_in(seconds: float | None):
    def apply_batch(writes: Sequence[Write]) -> list[Outcome]:
        if seconds is not None:
            time.sleep(seconds)
        revision = next(_revisions)
        return [Outcome(revision, tuple(False for _ in write.keys())) for write in writes]

    return apply_batch


_setting = os.environ.get("BENCH_COMMIT_SECONDS", "0.0003")
app.repository._group_commit.apply_batch = _stand_in(
    None if _setting == "none" else float(_setting)
)

__all__ = ["app"]
