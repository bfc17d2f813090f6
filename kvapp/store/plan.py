"""The write planner: every rule that decides what a batch of Writes does, with no I/O.

A backend opens a transaction, reads the current row of each key the batch
touches, calls plan(), and writes what it returns: the final row of each
key (or its deletion) and the new revision.  Both backends call this one
function, so conditions, TTLs, revisions and outcomes cannot drift apart
between them, and it is tested on its own against a dict model
(tests/test_plan.py).

The rules:
- Writes apply in order, as if one by one; each Write sees the effect of
  the Writes before it in the batch.
- A Write's conditions are all checked before any of its changes is made
  (RFC 9110 section 13.1 on the key's live version: None when the key is
  absent or expired).  When one fails, the Write changes nothing and its
  result is ConditionFailed naming that key; the batch goes on.
- A Delete of an absent key answers 404 whatever its condition says: RFC 9110
  section 13.2.1 ignores preconditions when the answer would not be 2xx
  anyway.  So its condition is not checked.
- A Write that changes something takes the next revision; every key it
  puts carries it.  A Write that changes nothing (a Delete of absent keys)
  takes none and reports the store's current revision.
- A Put with a ttl expires at now + ttl seconds (unix milliseconds).
- A Delete removes an expired row too, but reports the key as absent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from kvapp.store.base import ConditionFailed, Delete, Outcome, Put, Result, Write


class Row(NamedTuple):
    """What the planner needs of a stored row: its revision and its deadline (unix ms, or None)."""

    revision: int
    expires_at: int | None


NewRow = tuple[str, bytes, str, int, int | None]
"""A row to upsert: key, value, content_type, revision, expires_at."""


class Plan(NamedTuple):
    """What a batch does: each Write's result, and the rows to write to get there.

    revision: the store's revision after the batch (unchanged if nothing
    changed).  puts: the final row of each key put, by key.  deletes: the
    keys whose rows to delete; a key is in at most one of the two.
    """

    results: list[Result]
    revision: int
    puts: dict[str, NewRow]
    deletes: list[str]


def plan(
    rows: Mapping[str, tuple[int, int | None]], writes: Sequence[Write], revision: int, now: int
) -> Plan:
    """Return the Plan of writes applied in order to rows, at the store's revision and time now.

    rows: (revision, expires_at) of every stored row, live or expired, that
    the writes touch; a key missing from rows has no row.  Raises ValueError
    for a Write that changes one key twice.
    """
    state: dict[str, tuple[int, int | None] | None] = dict(rows)
    final: dict[str, NewRow | None] = {}
    results: list[Result] = []
    for write in writes:
        changes = write.changes
        if len(changes) != len({change.key for change in changes}):
            raise ValueError("a Write changes each key at most once")
        live = [_live(state.get(change.key), now) for change in changes]
        failed = _failed_condition(changes, live)
        if failed is not None:
            results.append(failed)
            continue
        next_revision = revision + 1
        changed = False
        for change in changes:
            key = change.key
            if isinstance(change, Put):
                expires_at = None if change.ttl is None else now + change.ttl * 1000
                state[key] = (next_revision, expires_at)
                final[key] = (key, change.value, change.content_type, next_revision, expires_at)
                changed = True
            elif state.get(key) is not None:
                state[key] = None
                final[key] = None
                changed = True
        if changed:
            revision = next_revision
        results.append(Outcome(revision, tuple(current is not None for current in live)))
    puts = {key: row for key, row in final.items() if row is not None}
    deletes = [key for key, row in final.items() if row is None]
    return Plan(results, revision, puts, deletes)


def _live(row: tuple[int, int | None] | None, now: int) -> int | None:
    """Return the revision of row if it holds a live value at now, else None."""
    if row is None or (row[1] is not None and row[1] <= now):
        return None
    return row[0]


def _failed_condition(
    changes: Sequence[Put | Delete], live: Sequence[int | None]
) -> ConditionFailed | None:
    """Return ConditionFailed for the first change whose condition does not hold, or None."""
    for change, current in zip(changes, live, strict=True):
        if change.condition is None or (current is None and isinstance(change, Delete)):
            continue
        if not change.condition.holds(current):
            return ConditionFailed(change.key)
    return None
