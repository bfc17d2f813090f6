"""The write planner on its own: no database, only rows in and a Plan out.

The hypothesis test checks plan() against a plain dict model that applies
one Write at a time, the way the rules read in kvapp/store/plan.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvapp.store.base import (
    ANY,
    Check,
    Condition,
    ConditionFailed,
    Delete,
    Item,
    Outcome,
    Put,
    ReadsTooLarge,
    Write,
)
from kvapp.store.plan import Plan, plan

NOW = 1_000_000


def put(key, value=b"v", ttl=None, condition=None):
    return Put(key, value, "text/plain", ttl, condition)


def test_an_empty_batch_changes_nothing():
    assert plan({}, [], 7, NOW) == Plan([], 7, {}, [], [], [])


def test_each_applied_write_takes_the_next_revision_and_its_puts_carry_it():
    result = plan({}, [Write.of(put("a"), put("b")), Write.of(put("a", b"2"))], 4, NOW)
    assert result.results == [Outcome(5, (False, False)), Outcome(6, (True,))]
    assert result.revision == 6
    assert result.puts == {
        "a": ("a", b"2", "text/plain", 6, None),
        "b": ("b", b"v", "text/plain", 5, None),
    }
    assert result.deletes == []


def test_a_failed_condition_fails_its_write_alone_and_changes_nothing_of_it():
    rows = {"a": (3, None)}
    writes = [
        Write.of(put("x"), put("a", condition=Condition(if_match=frozenset({99})))),
        Write.of(put("a", condition=Condition(if_match=frozenset({3})))),
    ]
    result = plan(rows, writes, 3, NOW)
    assert isinstance(result.results[0], ConditionFailed) and result.results[0].key == "a"
    assert result.results[1] == Outcome(4, (True,))
    assert set(result.puts) == {"a"}


def test_if_none_match_any_holds_only_for_an_absent_or_expired_key():
    create = Condition(if_none_match=ANY)
    rows = {"live": (1, None), "expired": (2, NOW), "later": (3, NOW + 1)}
    writes = [Write.of(put(key, condition=create)) for key in ("live", "expired", "later", "new")]
    results = plan(rows, writes, 3, NOW).results
    assert [type(r).__name__ for r in results] == [
        "ConditionFailed",
        "Outcome",
        "ConditionFailed",
        "Outcome",
    ]


def test_a_delete_of_an_absent_key_ignores_its_condition_and_takes_no_revision():
    # RFC 9110 section 13.2.1: the answer is 404 whatever the precondition says.
    result = plan({}, [Write.of(Delete("a", Condition(if_match=frozenset({1}))))], 9, NOW)
    assert result.results == [Outcome(9, (False,))]
    assert result == Plan(result.results, 9, {}, [], [], [])


def test_a_delete_removes_an_expired_row_but_reports_the_key_absent():
    result = plan({"a": (2, NOW - 1)}, [Write.of(Delete("a"))], 2, NOW)
    assert result.results == [Outcome(3, (False,))]
    assert result.deletes == ["a"] and result.puts == {}


def test_a_ttl_sets_the_deadline_in_unix_milliseconds():
    result = plan({}, [Write.of(put("a", ttl=30))], 0, NOW)
    assert result.puts["a"][4] == NOW + 30_000


def test_a_later_write_sees_an_earlier_write_of_the_same_batch():
    writes = [
        Write.of(put("a")),
        Write.of(put("a", b"2", condition=Condition(if_match=frozenset({1})))),
        Write.of(Delete("a", Condition(if_match=frozenset({2})))),
    ]
    result = plan({}, writes, 0, NOW)
    assert result.results == [Outcome(1, (False,)), Outcome(2, (True,)), Outcome(3, (True,))]
    assert result.deletes == ["a"] and result.puts == {}


def test_a_write_that_changes_one_key_twice_is_refused():
    with pytest.raises(ValueError, match="at most once"):
        plan({}, [Write.of(put("a"), Delete("a"))], 0, NOW)


# -- against a dict model ---------------------------------------------------

KEYS = st.sampled_from(["a", "b", "c", "d"])
TAGS = st.one_of(st.just(ANY), st.frozensets(st.integers(0, 8), max_size=3))
CONDITIONS = st.one_of(
    st.none(),
    st.builds(Condition, if_match=TAGS, if_none_match=st.none()),
    st.builds(Condition, if_match=st.none(), if_none_match=TAGS),
    st.builds(Condition, if_match=TAGS, if_none_match=TAGS),
)
TTLS = st.one_of(st.none(), st.integers(0, 3))
CHANGES = st.one_of(
    st.builds(put, KEYS, st.binary(max_size=3), TTLS, CONDITIONS),
    st.builds(Delete, KEYS, CONDITIONS),
)
WRITES = st.lists(st.lists(CHANGES, min_size=1, max_size=3), max_size=6).map(
    lambda writes: [
        Write(tuple({change.key: change for change in changes}.values())) for changes in writes
    ]
)
ROWS = st.dictionaries(
    KEYS, st.tuples(st.integers(1, 6), st.one_of(st.none(), st.integers(NOW - 2, NOW + 2)))
)


def model(rows, writes, revision, now):
    """The rules, one Write at a time, on a dict of key -> (value, revision, expires_at)."""
    store = {key: (None, rev, until) for key, (rev, until) in rows.items()}
    results = []
    for write in writes:

        def live(key):
            row = store.get(key)
            return None if row is None or (row[2] is not None and row[2] <= now) else row[1]

        before = {change.key: live(change.key) for change in write.changes}
        failed = next(
            (
                change.key
                for change in write.changes
                if change.condition is not None
                and not (before[change.key] is None and isinstance(change, Delete))
                and not change.condition.holds(before[change.key])
            ),
            None,
        )
        if failed is not None:
            results.append(("failed", failed))
            continue
        changed = any(isinstance(c, Put) or c.key in store for c in write.changes)
        if changed:
            revision += 1
        for change in write.changes:
            if isinstance(change, Put):
                until = None if change.ttl is None else now + change.ttl * 1000
                store[change.key] = (change.value, revision, until)
            else:
                store.pop(change.key, None)
        results.append((revision, tuple(before[c.key] is not None for c in write.changes)))
    return results, revision, store


@given(ROWS, WRITES, st.integers(6, 10))
def test_the_planner_agrees_with_the_dict_model(rows, writes, revision):
    result = plan(rows, writes, revision, NOW)
    results, final_revision, store = model(rows, writes, revision, NOW)
    assert [
        ("failed", r.key) if isinstance(r, ConditionFailed) else (r.revision, r.existed)
        for r in result.results
    ] == results
    assert result.revision == final_revision
    # Applying the plan's rows to the rows it was given leaves what the model holds.
    after = {key: (None, rev, until) for key, (rev, until) in rows.items()}
    for key in result.deletes:
        after.pop(key, None)
    for key, (_, value, _, rev, until) in result.puts.items():
        after[key] = (value, rev, until)
    assert {k: v[1:] for k, v in after.items()} == {k: v[1:] for k, v in store.items()}
    assert {k: v[0] for k, v in after.items() if v[0] is not None} == {
        k: v[0] for k, v in store.items() if v[0] is not None
    }
    assert not set(result.deletes) & set(result.puts)


@given(ROWS, WRITES, st.integers(6, 10))
def test_a_batch_plans_as_its_writes_one_by_one(rows, writes, revision):
    whole = plan(rows, writes, revision, NOW)
    state = dict(rows)
    results = []
    for write in writes:
        single = plan(state, [write], revision, NOW)
        results += single.results
        revision = single.revision
        for key in single.deletes:
            state.pop(key, None)
        for key, row in single.puts.items():
            state[key] = (row[3], row[4])
    assert [(type(r), getattr(r, "key", r)) for r in whole.results] == [
        (type(r), getattr(r, "key", r)) for r in results
    ]
    assert whole.revision == revision


# -- transactions in a batch ---------------------------------------------------------------------


def txn(checks, changes=(), reads=(), otherwise=None, read_limit=None):
    return Write(tuple(changes), tuple(reads), tuple(checks), otherwise, read_limit)


def test_a_transaction_sees_the_writes_before_it_in_its_batch():
    rows = {"a": (3, None)}
    sizes = {"a": 5}
    writes = [
        Write.of(put("a", b"new")),  # revision 8
        txn([Check("a", Condition(if_match=frozenset({8})))], [put("b")], ["a", "b"]),
        txn(
            [Check("a", Condition(if_match=frozenset({3})))],
            [put("c")],
            otherwise=Write((), ("a",)),
        ),
        Write.of(Delete("a")),  # revision 10
        txn([Check("a", Condition(if_none_match=ANY))], reads=["a"]),
    ]
    planned = plan(rows, writes, 7, NOW, sizes)
    assert planned.fetch == []  # every read is of a value put in this batch, or of none
    results = planned.results
    assert results[1] == Outcome(9, (False,), True, (Item(b"new", "text/plain", 8), None))
    assert results[2] == Outcome(9, (), False, (Item(b"new", "text/plain", 8),))
    assert results[4] == Outcome(10, (), True, (None,))


def test_a_read_of_a_stored_value_is_filled_from_the_store_before_the_batch_writes_it():
    rows = {"a": (3, None), "old": (2, NOW - 1)}
    writes = [txn([], [put("a", b"2")], ["a", "old", "none"]), txn([], reads=["a"])]
    planned = plan(rows, writes, 7, NOW, {"a": 1, "old": 9})
    assert planned.fetch == [(0, 0, "a")]  # the expired row is absent: nothing to read
    assert planned.fetch_keys() == ["a"]
    results = planned.filled({"a": (b"1", "x/y")})
    assert results[0].items == (Item(b"1", "x/y", 3), None, None)
    assert results[1].items == (Item(b"2", "text/plain", 8),)


def test_reads_over_the_limit_fail_their_write_alone_and_read_nothing():
    rows = {"a": (3, None), "b": (4, None)}
    writes = [
        txn([], [put("c")], ["a", "b"], read_limit=10),
        txn([], [put("d")], ["a"], read_limit=10),
        txn(
            [Check("a", Condition(if_match=frozenset({9})))],
            [],
            ["a", "b"],
            otherwise=Write((), ("b",)),
            read_limit=10,
        ),
    ]
    planned = plan(rows, writes, 7, NOW, {"a": 6, "b": 5})
    assert isinstance(planned.results[0], ReadsTooLarge)
    assert str(planned.results[0]).startswith("the gets of this transaction would answer 11 bytes")
    assert planned.results[1] == Outcome(8, (False,), True, (Item(b"", "", 3),))
    assert planned.results[2] == Outcome(8, (), False, (Item(b"", "", 4),))
    assert set(planned.puts) == {"d"}
    assert [index for index, _, _ in planned.fetch] == [1, 2]


def test_a_transactions_branch_ignores_its_changes_conditions_no_more_than_a_write_does():
    rows = {"a": (3, None)}
    failing = put("a", condition=Condition(if_match=frozenset({1})))
    planned = plan(rows, [txn([], [failing])], 7, NOW, {})
    assert isinstance(planned.results[0], ConditionFailed)
