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
- Every change made is one Event of its Write's revision, numbered from 0
  in the Write's order: a put, a delete, or (a Delete that removed an
  expired row) an expiry.
- A transaction's checks are all evaluated on the state before it; if all
  hold, its own changes and reads are the branch taken, else its
  otherwise's (succeeded=False).  Its reads see that same state, before
  any change of the branch: a read of a key the branch puts answers the
  value it replaces.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from kvapp.store.base import (
    DELETE,
    EXPIRED,
    PUT,
    ConditionFailed,
    Delete,
    Event,
    Item,
    Outcome,
    Put,
    ReadsTooLarge,
    Result,
    Write,
)


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
    keys whose rows to delete; a key is in at most one of the two.  events:
    every change, for the change log, in (revision, n) order.
    """

    results: list[Result]
    revision: int
    puts: dict[str, NewRow]
    deletes: list[str]
    events: list[Event]
    fetch: list[tuple[int, int, str]]
    """(result, item, key) of each read answered by a stored value: filled() fills them in."""

    def fetch_keys(self) -> list[str]:
        """Return the keys whose stored values and content types the reads answer."""
        return list(dict.fromkeys(key for _, _, key in self.fetch))

    def filled(self, values: Mapping[str, tuple[bytes, str]]) -> list[Result]:
        """Return the results, each read of a stored value answered from values.

        values: (value, content_type) of fetch_keys(), read after plan() and
        before its rows are written, in the same transaction.
        """
        results = list(self.results)
        for index, position, key in self.fetch:
            outcome = results[index]
            assert isinstance(outcome, Outcome)
            items = list(outcome.items)
            pending = items[position]
            assert pending is not None
            value, content_type = values[key]
            items[position] = Item(value, content_type, pending.revision)
            results[index] = outcome._replace(items=tuple(items))
        return results


def plan(
    rows: Mapping[str, tuple[int, int | None]],
    writes: Sequence[Write],
    revision: int,
    now: int,
    sizes: Mapping[str, int] | None = None,
) -> Plan:
    """Return the Plan of writes applied in order to rows, at the store's revision and time now.

    rows: (revision, expires_at) of every stored row, live or expired, that
    the writes touch; a key missing from rows has no row.  sizes: the length
    of the stored value of every key the writes read, so that a read over
    its Write's read_limit costs no more than its length.  Raises ValueError
    for a Write that changes one key twice.
    """
    state: dict[str, tuple[int, int | None] | None] = dict(rows)
    contents: dict[str, tuple[bytes, str]] = {}  # values put by the batch so far
    final: dict[str, NewRow | None] = {}
    results: list[Result] = []
    events: list[Event] = []
    fetch: list[tuple[int, int, str]] = []
    for write in writes:
        succeeded = not write.checks or all(
            check.condition.holds(_live(state.get(check.key), now)) for check in write.checks
        )
        branch = write if succeeded else write.otherwise or _NOTHING
        changes = branch.changes
        if len(changes) != len({change.key for change in changes}):
            raise ValueError("a Write changes each key at most once")
        items: list[Item | None] = []
        pending: list[tuple[int, int, str]] = []
        total = 0
        for position, key in enumerate(branch.reads):  # none but in a transaction
            live_revision = _live(state.get(key), now)
            if live_revision is None:
                items.append(None)
            elif key in contents:
                value, content_type = contents[key]
                items.append(Item(value, content_type, live_revision))
                total += len(value)
            else:  # the stored value, read once the plan is made
                items.append(Item(b"", "", live_revision))
                pending.append((len(results), position, key))
                total += (sizes or {})[key]
        if write.read_limit is not None and total > write.read_limit:
            results.append(ReadsTooLarge(total, write.read_limit))
            continue
        live = [_live(state.get(change.key), now) for change in changes]
        failed = _failed_condition(changes, live)
        if failed is not None:
            results.append(failed)
            continue
        fetch += pending
        next_revision = revision + 1
        n = 0
        for change, current in zip(changes, live, strict=True):
            key = change.key
            if isinstance(change, Put):
                expires_at = None if change.ttl is None else now + change.ttl * 1000
                state[key] = (next_revision, expires_at)
                contents[key] = (change.value, change.content_type)
                final[key] = (key, change.value, change.content_type, next_revision, expires_at)
                event = Event(
                    next_revision, n, key, PUT, change.value, change.content_type, expires_at
                )
            elif state.get(key) is not None:
                state[key] = None
                final[key] = None
                event = Event(next_revision, n, key, DELETE if current is not None else EXPIRED)
            else:
                continue
            events.append(event)
            n += 1
        if n:
            revision = next_revision
        existed = tuple(current is not None for current in live)
        results.append(Outcome(revision, existed, succeeded, tuple(items)))
    puts = {key: row for key, row in final.items() if row is not None}
    deletes = [key for key, row in final.items() if row is None]
    return Plan(results, revision, puts, deletes, events, fetch)


_NOTHING = Write(())


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


def history_cut(
    oldest: list[tuple[int, int]], before_ms: int, beyond: int | None, limit: int
) -> int | None:
    """Return the last revision to remove from the change log, or None to remove none.

    oldest: (revision, committed_at) of up to limit + 1 oldest events.  A
    revision goes if it was committed before before_ms or is at most beyond
    (the newest revision past the count to keep); the walk stops at the
    first that stays.  Whole revisions only: when all limit + 1 qualify, the
    last revision may go on past them and is kept for the next batch,
    unless it is the only one.
    """
    cut = None
    for revision, committed_at in oldest:
        if committed_at >= before_ms and (beyond is None or revision > beyond):
            return cut
        cut = revision
    if cut is not None and len(oldest) > limit and oldest[0][0] != cut:
        return cut - 1
    return cut
