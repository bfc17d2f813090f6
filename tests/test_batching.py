"""Group commit: batches form under concurrency, nothing is answered early, errors reach all.

The storage here is a double whose apply_batch can be held on an Event or
made to fail, or the real SQLiteStore's apply_batch behind such a gate.
Every wait is for a state (a thread queued, a batch started), bounded; no
assertion is about time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import pytest
import webtest

from kvapp.store.base import (
    ANY,
    Condition,
    ConditionFailed,
    Delete,
    Outcome,
    Put,
    StorageFull,
    Write,
)
from kvapp.store.groupcommit import BatchInterrupted, GroupCommit
from kvapp.store.sqlite import SQLiteStore

WAIT_S = 20


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.001)


def put(key: str, value: bytes = b"v", condition: Condition | None = None) -> Write:
    return Write.of(Put(key, value, "text/plain", None, condition))


class Gate:
    """Wraps an apply_batch: records each batch, holds chosen ones until opened, can fail."""

    def __init__(self, inner: Callable[[Sequence[Write]], list] | None = None) -> None:
        self.inner = inner or self.succeed
        self.batches: list[list[Write]] = []
        self.threads: list[threading.Thread] = []
        self.held: dict[int, tuple[threading.Event, threading.Event, bool]] = {}
        self.fail_with: BaseException | None = None  # raised by every batch after the first
        self.returned = 0  # batches whose apply_batch has returned or raised

    @staticmethod
    def succeed(writes: Sequence[Write]) -> list:
        return [Outcome(n + 1, (False,) * len(write.changes)) for n, write in enumerate(writes)]

    def hold(self, number: int, after_apply: bool = False) -> tuple[threading.Event, ...]:
        """Hold batch number (0: the first) before or after applying it; return (started, open)."""
        started, opened = threading.Event(), threading.Event()
        self.held[number] = (started, opened, after_apply)
        return started, opened

    def __call__(self, writes: Sequence[Write]) -> list:
        number = len(self.batches)
        self.batches.append(list(writes))
        self.threads.append(threading.current_thread())
        started, opened, after_apply = self.held.get(number, (None, None, False))
        try:
            if opened is not None and not after_apply:
                started.set()
                assert opened.wait(WAIT_S)
            if self.fail_with is not None and number > 0:
                raise self.fail_with
            results = self.inner(writes)
            if opened is not None and after_apply:
                started.set()
                assert opened.wait(WAIT_S)
            return results
        finally:
            self.returned += 1

    @property
    def sizes(self) -> list[int]:
        return [len(batch) for batch in self.batches]


class Submitters:
    """Threads that each submit one write and keep what came back."""

    def __init__(self, group: GroupCommit) -> None:
        self.group = group
        self.results: dict[str, object] = {}
        self.threads: list[threading.Thread] = []

    def start(self, name: str, write: Write) -> None:
        def run() -> None:
            try:
                self.results[name] = self.group.submit(write)
            except BaseException as exc:
                self.results[name] = exc

        thread = threading.Thread(target=run, name=name)
        self.threads.append(thread)
        thread.start()

    def join(self) -> None:
        for thread in self.threads:
            thread.join(WAIT_S)
        assert not any(thread.is_alive() for thread in self.threads)


def queued(group: GroupCommit) -> int:
    return len(group._queue)


def behind_a_held_batch(
    gate: Gate, group: GroupCommit, writes: dict[str, Write]
) -> tuple[Submitters, threading.Event]:
    """Hold a first batch of one write, queue writes behind it one by one; return (them, open)."""
    started, opened = gate.hold(0)
    submitters = Submitters(group)
    submitters.start("first", put("first"))
    assert started.wait(WAIT_S)
    for n, (name, write) in enumerate(writes.items()):
        submitters.start(name, write)
        wait_until(lambda n=n: queued(group) == n + 1, f"{name} waits behind the first batch")
    return submitters, opened


def numbered(count: int, size: int = 2) -> dict[str, Write]:
    return {f"w{n}": put(f"k{n}", b"v" * size) for n in range(count)}


def test_a_lone_write_commits_at_once_in_its_own_thread():
    gate = Gate()
    group = GroupCommit(gate)
    outcome = group.submit(put("a"))
    assert outcome == Outcome(1, (False,))
    assert gate.sizes == [1]
    # No committer thread and no timer: the submitting thread applied it itself.
    assert gate.threads == [threading.current_thread()]
    assert group.submit(put("b")) == Outcome(1, (False,))
    assert gate.sizes == [1, 1]


def test_writes_that_arrive_during_a_commit_share_the_next_one():
    gate = Gate()
    group = GroupCommit(gate)
    submitters, opened = behind_a_held_batch(gate, group, numbered(5))
    opened.set()
    submitters.join()
    assert gate.sizes == [1, 5]
    assert [write.changes[0].key for write in gate.batches[1]] == [f"k{n}" for n in range(5)]
    # The second batch was applied by one of the waiting threads, not by a new one.
    assert gate.threads[1].name in {f"w{n}" for n in range(5)}
    assert submitters.results == {"first": Outcome(1, (False,))} | {
        f"w{n}": Outcome(n + 1, (False,)) for n in range(5)
    }


def test_no_submitter_is_answered_before_apply_batch_returns():
    gate = Gate()
    group = GroupCommit(gate)
    applied, returns = gate.hold(1, after_apply=True)
    submitters, opened = behind_a_held_batch(gate, group, numbered(4))
    opened.set()
    # The second batch is applied (its results exist) but apply_batch has not returned.
    assert applied.wait(WAIT_S)
    assert gate.returned == 1
    wait_until(lambda: "first" in submitters.results, "the first batch is answered")
    assert set(submitters.results) == {"first"}
    assert sum(thread.is_alive() for thread in submitters.threads) == 4
    returns.set()
    submitters.join()
    assert gate.returned == 2
    assert len(submitters.results) == 5


def test_a_failed_batch_fails_every_request_of_it_and_none_succeeds():
    gate = Gate()
    gate.fail_with = StorageFull("the disk is full: nothing was stored; free space and retry")
    group = GroupCommit(gate)
    submitters, opened = behind_a_held_batch(gate, group, numbered(6))
    opened.set()
    submitters.join()
    assert submitters.results["first"] == Outcome(1, (False,))
    errors = [submitters.results[f"w{n}"] for n in range(6)]
    assert all(isinstance(error, StorageFull) for error in errors), errors
    assert {str(error) for error in errors} == {str(gate.fail_with)}
    # Each thread raised its own exception object, chained to the one that failed the batch.
    assert len({id(error) for error in errors}) == 6
    assert sum(error is gate.fail_with for error in errors) == 1
    assert all(error is gate.fail_with or error.__cause__ is gate.fail_with for error in errors)
    # The group keeps working after a failed batch.
    gate.fail_with = None
    assert group.submit(put("after")) == Outcome(1, (False,))


def test_an_interrupted_leader_fails_its_followers_without_interrupting_them():
    gate = Gate()
    gate.fail_with = KeyboardInterrupt()
    group = GroupCommit(gate)
    submitters, opened = behind_a_held_batch(gate, group, numbered(3))
    opened.set()
    submitters.join()
    errors = [submitters.results[f"w{n}"] for n in range(3)]
    assert sum(isinstance(error, KeyboardInterrupt) for error in errors) == 1  # the leader
    assert sum(isinstance(error, BatchInterrupted) for error in errors) == 2


class Stalled(Exception):
    def __init__(self, age: float, in_batch: bool) -> None:
        super().__init__(f"{age:.1f} s")
        self.in_batch = in_batch


def stalling_group(gate: Gate, after: float) -> GroupCommit:
    return GroupCommit(gate, stalled_after=after, stalled=Stalled)


def test_writes_waiting_behind_a_stalled_batch_fail_and_free_their_threads():
    gate = Gate()
    group = stalling_group(gate, 0.2)
    submitters, opened = behind_a_held_batch(gate, group, numbered(3))
    # The first batch never ends: every write queued behind it gives up.
    wait_until(lambda: len(submitters.results) == 3, "the queued writes give up")
    refused = [submitters.results[f"w{n}"] for n in range(3)]
    assert all(isinstance(error, Stalled) and not error.in_batch for error in refused)
    assert queued(group) == 0
    with pytest.raises(Stalled) as late:  # a new write does not even queue
        group.submit(put("late"))
    assert not late.value.in_batch
    assert group.stalled_for() > 0.2
    opened.set()
    submitters.join()
    # The leader waited for the outcome of its batch; nothing refused was applied.
    assert submitters.results["first"] == Outcome(1, (False,))
    assert gate.sizes == [1]
    assert group.stalled_for() == 0
    assert group.submit(put("after")) == Outcome(1, (False,))
    assert gate.sizes == [1, 1]


def test_writes_in_a_stalled_batch_stop_waiting_and_only_its_leader_waits():
    gate = Gate()
    group = stalling_group(gate, 2.0)  # time enough to queue three writes behind the first
    started, opened_second = gate.hold(1)
    submitters, opened = behind_a_held_batch(gate, group, numbered(3))
    opened.set()
    assert started.wait(WAIT_S)  # the three are the second batch, which now hangs
    leader = gate.threads[1].name
    others = {f"w{n}" for n in range(3)} - {leader}
    wait_until(lambda: others <= set(submitters.results), "the batch's followers give up")
    # Their writes are in the batch, which may yet commit: the outcome is unknown.
    assert all(submitters.results[name].in_batch for name in others)
    assert leader not in submitters.results
    opened_second.set()
    submitters.join()
    assert submitters.results[leader] == Outcome(int(leader[1:]) + 1, (False,))
    assert gate.sizes == [1, 3]  # and it did commit, all three


def test_without_stalled_after_writes_wait_behind_any_batch():
    with pytest.raises(ValueError):
        GroupCommit(Gate(), stalled_after=1.0)
    with pytest.raises(ValueError):
        GroupCommit(Gate(), stalled=Stalled)
    gate = Gate()
    group = GroupCommit(gate)
    submitters, opened = behind_a_held_batch(gate, group, numbered(2))
    time.sleep(0.3)  # longer than the stalling groups above give a batch
    assert set(submitters.results) == set()
    opened.set()
    submitters.join()
    assert gate.sizes == [1, 2]


def test_a_batch_is_capped_by_count_and_by_bytes():
    gate = Gate()
    group = GroupCommit(gate, max_writes=3)
    submitters, opened = behind_a_held_batch(gate, group, numbered(7))
    opened.set()
    submitters.join()
    assert gate.sizes == [1, 3, 3, 1]

    gate = Gate()
    group = GroupCommit(gate, max_bytes=100)
    sizes = (40, 40, 40, 500, 10)
    writes = {f"w{n}": put(f"k{n}", b"x" * (size - 2)) for n, size in enumerate(sizes)}
    submitters, opened = behind_a_held_batch(gate, group, writes)
    opened.set()
    submitters.join()
    # 40+40 fit in 100 bytes, a third 40 does not; a write over the cap still goes, alone.
    assert gate.sizes == [1, 2, 1, 1, 1]


def test_a_write_that_names_a_key_twice_fails_alone_before_joining_a_batch():
    gate = Gate()
    group = GroupCommit(gate)
    with pytest.raises(ValueError):
        group.submit(Write.of(Put("a", b"", "t"), Delete("a")))
    assert gate.batches == []


# -- the real repository behind a gate ---------------------------------------


@pytest.fixture
def repo(db_path):
    repository = SQLiteStore(str(db_path))
    yield repository
    repository.close()


def test_mixed_batch_on_the_repository_gives_each_request_its_own_result(repo):
    repo.apply(put("cas", b"0"))  # revision 1
    repo.apply(put("gone", b"0"))  # revision 2
    gate = Gate(repo.apply_batch)
    repo._group_commit.apply_batch = gate
    sizes = []
    repo.on_commit = sizes.append
    writes = {
        "new": put("new", b"1"),
        "cas-stale": put("cas", b"stale", Condition(if_match=frozenset({99}))),
        "cas-right": put("cas", b"right", Condition(if_match=frozenset({1}))),
        "cas-late": put("cas", b"late", Condition(if_match=frozenset({1}))),
        "create-only": put("new", b"2", Condition(if_none_match=ANY)),
        "delete": Write.of(Delete("gone")),
        "delete-absent": Write.of(Delete("never")),
        "pair": Write.of(Put("p1", b"1", "t"), Put("p2", b"2", "t")),
        "pair-failing": Write.of(
            Put("q1", b"1", "t"), Put("q2", b"2", "t", condition=Condition(if_match=ANY))
        ),
    }
    first, opened = behind_a_held_batch(gate, repo._group_commit, writes)
    opened.set()
    first.join()
    assert gate.sizes == [1, len(writes)]
    assert sizes == [1, len(writes)]  # on_commit (the metrics) sees the real batch sizes
    results = first.results
    assert results["first"] == Outcome(3, (False,))
    assert results["new"] == Outcome(4, (False,))
    assert isinstance(results["cas-stale"], ConditionFailed)
    assert results["cas-right"] == Outcome(5, (True,))
    # Applied in order: the first CAS changed the version, so the second one loses.
    assert isinstance(results["cas-late"], ConditionFailed)
    assert isinstance(results["create-only"], ConditionFailed)
    assert results["delete"] == Outcome(6, (True,))
    assert results["delete-absent"] == Outcome(6, (False,))
    assert results["pair"] == Outcome(7, (False, False))
    assert isinstance(results["pair-failing"], ConditionFailed)
    assert repo.get("cas") == (b"right", "text/plain", 5)
    assert repo.get("new") == (b"1", "text/plain", 4)
    assert repo.get("gone") is None
    assert repo.get("p2") == (b"2", "t", 7)
    assert repo.get("q1") is None and repo.get("q2") is None


def test_a_batch_larger_than_one_statement_puts_and_deletes_every_key(repo):
    # 1,100 keys: three chunks of each statement (lookup, INSERT, DELETE), the
    # last one partial, so padding and chunk edges are both exercised.
    keys = [f"k{n:04d}" for n in range(1100)]
    repo.apply(put("k0000", b"old"))  # revision 1: one key exists before
    results = repo.apply_batch([put(key, key.encode()) for key in keys])
    assert results == [Outcome(2 + n, (n == 0,)) for n in range(1100)]
    assert repo.get("k0000") == (b"k0000", "text/plain", 2)
    assert repo.get("k1099") == (b"k1099", "text/plain", 1101)
    assert repo.list_keys("", None, 2000).keys == keys
    odd = keys[1::2]
    deleted = repo.apply_batch([Write.of(*(Delete(key) for key in odd)), Write.of(Delete("no"))])
    assert deleted == [Outcome(1102, (True,) * 550), Outcome(1102, (False,))]
    assert repo.list_keys("", None, 2000).keys == keys[::2]
    assert repo.get(odd[-1]) is None and repo.get("k1098").revision == 1100


def test_a_failed_batch_on_the_repository_stores_nothing_of_it(repo):
    repo.apply(put("before", b"1"))
    gate = Gate(repo.apply_batch)
    repo._group_commit.apply_batch = gate
    writer = repo._writer
    first, opened = behind_a_held_batch(gate, repo._group_commit, numbered(4, size=5000))
    # The next transaction meets a full database (SQLite's own size cap: SQLITE_FULL).
    pages = writer.execute("PRAGMA page_count").fetchone()[0]
    writer.execute(f"PRAGMA max_page_count = {pages}")
    opened.set()
    first.join()
    writer.execute("PRAGMA max_page_count = 1073741823")
    assert gate.sizes == [1, 4]
    assert [type(first.results[f"w{n}"]) for n in range(4)] == [StorageFull] * 4
    assert all(repo.get(f"k{n}") is None for n in range(4))
    assert repo.get("before").value == b"1"


# -- every route's write goes through group commit ---------------------------


def test_every_kind_of_write_request_joins_a_batch(app):
    client = webtest.TestApp(app)
    client.put("/kv/cas", b"0")
    client.put("/kv/gone", b"0")
    client.get("/set?old=0")
    etag = client.get("/kv/cas").headers["ETag"]
    repo = app.repository
    gate = Gate(repo.apply_batch)
    started, opened = gate.hold(0)
    repo._group_commit.apply_batch = gate
    requests: dict[str, Callable[[webtest.TestApp], webtest.TestResponse]] = {
        "set": lambda c: c.get("/set?a=1&b=2"),
        "post-set": lambda c: c.post("/set", {"c": "3"}),
        "put": lambda c: c.put("/kv/new", b"new", content_type="image/png"),
        "put-ttl": lambda c: c.put("/kv/ttl?ttl=60", b"t"),
        "put-if-match": lambda c: c.put("/kv/cas", b"1", headers={"If-Match": etag}),
        "put-if-match-lost": lambda c: c.put(
            "/kv/cas", b"2", headers={"If-Match": etag}, expect_errors=True
        ),
        "put-if-none-match": lambda c: c.put(
            "/kv/new", b"x", headers={"If-None-Match": "*"}, expect_errors=True
        ),
        "delete": lambda c: c.delete("/kv/gone"),
        "delete-absent": lambda c: c.delete("/kv/never", expect_errors=True),
        "delete-form": lambda c: c.get("/delete?key=old"),
    }
    answers: dict[str, webtest.TestResponse] = {}

    def send(name: str, request: Callable) -> None:
        answers[name] = request(webtest.TestApp(app))

    first = threading.Thread(target=send, args=("first", lambda c: c.get("/set?first=1")))
    first.start()
    assert started.wait(WAIT_S)
    threads = [first]
    for n, (name, request) in enumerate(requests.items()):
        thread = threading.Thread(target=send, args=(name, request))
        threads.append(thread)
        thread.start()
        wait_until(lambda n=n: queued(repo._group_commit) == n + 1, f"{name} is queued")
    opened.set()
    for thread in threads:
        thread.join(WAIT_S)
    assert gate.sizes == [1, len(requests)]
    status = {name: answer.status_int for name, answer in answers.items()}
    assert status == {
        "first": 200,
        "set": 200,
        "post-set": 200,
        "put": 201,
        "put-ttl": 201,
        "put-if-match": 204,
        "put-if-match-lost": 412,
        "put-if-none-match": 412,
        "delete": 204,
        "delete-absent": 404,
        "delete-form": 200,
    }
    assert client.get("/kv/cas").body == b"1"
    assert client.get("/kv/new").content_type == "image/png"
    assert client.get("/get?key=b").body == b"2"
    client.get("/kv/gone", status=404)
    client.get("/get?key=old", status=404)
    # /metrics counts commits by their real batch sizes.
    metrics = client.get("/metrics").text
    assert 'kvapp_commit_batch_size_bucket{le="8"} 4\n' in metrics  # 3 setup writes + first
    assert f"kvapp_commit_batch_size_sum {4 + len(requests)}\n" in metrics
    assert "kvapp_commits_total 5\n" in metrics
