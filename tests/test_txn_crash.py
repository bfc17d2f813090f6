"""kill -9 at random moments under concurrent POST /txn transactions.

Each round starts `python -m kvapp serve --workers 2` on the database the
previous round crashed (so every round also proves the server restarts on
it), lets several client threads send transactions, and SIGKILLs both
workers and their supervisor at a random moment.

Client thread n keeps a chain: its key head<n> names its latest
transaction.  Transaction tid of thread n is conditioned on head<n>'s ETag
(as the thread last learnt it; a new connection first reads it), and puts
K keys t<tid>-0 ... t<tid>-<K-1> with one value, puts head<n> = tid and a
marker d<tid>, deletes the marker of the thread's previous transaction,
and gets head<n> (the value it replaces).

Then the crash state (for SQLite a copy of the files, untouched for the
next round's restart) must hold every acknowledged transaction whole, at
the revision its answer gave, and no transaction in part: for each, all K
keys or none.  Each thread's head and marker must name its latest applied
transaction, and PRAGMA integrity_check must pass.

TXN_CRASH_ROUNDS (default 8) and TXN_CRASH_SEED make a run longer or
repeat one; the seed of every run is printed.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import KvappServer, child_pids, copy_database, stored
from workerkit import wait_for, workers_of

pytestmark = pytest.mark.slow

ROUNDS = int(os.environ.get("TXN_CRASH_ROUNDS", "8"))
CLIENT_THREADS = 6
K = 4  # keys each transaction puts with its value
JSON_TYPE = {"Content-Type": "application/json"}
TEXT = "text/plain; charset=utf-8"  # the content type of a put's "value"


def value_of(tid: int) -> str:
    """Return the value txn tid puts at its K keys: of varied size, so commits span pages."""
    return f"{tid}:" + "x" * (tid * 37 % 400)


def etag(revision: int) -> str:
    return f'"{revision}"'


@dataclass
class Ledger:
    """What the clients sent and what the server answered, across all rounds."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    next_tid: int = 0
    thread_of: dict[int, int] = field(default_factory=dict)  # every transaction sent
    acknowledged: dict[int, int] = field(default_factory=dict)  # tid -> revision answered
    refused: dict[int, str] = field(default_factory=dict)  # any other answer
    errors: list[str] = field(default_factory=list)  # answers that contradict the chain

    def new_txn(self, thread_no: int) -> int:
        with self.lock:
            tid = self.next_tid
            self.next_tid += 1
            self.thread_of[tid] = thread_no
            return tid


def document(tid: int, thread_no: int, previous: int | None, tag: str | None) -> dict:
    """Return transaction tid of thread_no, which last learnt head<n> = previous at ETag tag."""
    head = f"head{thread_no}"
    condition = {"key": head, "exists": False} if tag is None else {"key": head, "etag": tag}
    then = [{"put": f"t{tid}-{j}", "value": value_of(tid)} for j in range(K)]
    then += [{"put": head, "value": str(tid)}, {"put": f"d{tid}", "value": "marker"}]
    if previous is not None:
        then.append({"delete": f"d{previous}"})
    then.append({"get": head})
    return {"if": [condition], "then": then}


def post(conn: http.client.HTTPConnection, body: dict) -> tuple[int, bytes]:
    conn.request("POST", "/txn", json.dumps(body).encode(), JSON_TYPE)
    response = conn.getresponse()
    return response.status, response.read()


def client_loop(thread_no: int, port: int, ledger: Ledger, stop: threading.Event) -> None:
    """Send the thread's chain of transactions on one connection until the server dies."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    head = f"head{thread_no}"
    try:
        try:
            status, data = post(conn, {"then": [{"get": head}]})
        except (OSError, http.client.HTTPException):
            return  # killed before this thread got going
        assert status == 200, (status, data)
        (found,) = json.loads(data)["results"]
        previous, tag = (int(found["value"]), found["etag"]) if found["found"] else (None, None)
        while not stop.is_set():
            tid = ledger.new_txn(thread_no)
            try:
                status, data = post(conn, document(tid, thread_no, previous, tag))
            except (OSError, http.client.HTTPException):
                return  # killed mid-request: this one's outcome is unknown
            with ledger.lock:
                if status != 200:
                    ledger.refused[tid] = f"{status} {data[:200]!r}"
                    return
                answer = json.loads(data)
                revision, results = answer["revision"], answer["results"]
                replaced = {"get": head, "found": False}
                if previous is not None:
                    replaced = {"get": head, "found": True, "value": str(previous)}
                    replaced.update(content_type=TEXT, etag=tag)
                if not answer["succeeded"]:
                    ledger.errors.append(f"txn {tid}: its condition on {head} failed: {answer}")
                    return
                if results[K] != {"put": head, "etag": etag(revision), "created": tag is None}:
                    ledger.errors.append(f"txn {tid}: the put of {head} answered {results[K]}")
                if results[-1] != replaced:
                    ledger.errors.append(f"txn {tid}: read {results[-1]}, not {replaced}")
                ledger.acknowledged[tid] = revision
                previous, tag = tid, etag(revision)
    finally:
        conn.close()


def kill_9(server: KvappServer, workers: list[int]) -> None:
    """SIGKILL the workers and their supervisor, without giving it a moment to fork new ones."""
    server.proc.send_signal(signal.SIGSTOP)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    server.proc.kill()
    server.proc.wait(timeout=15)

    def all_gone() -> bool:
        for pid in workers:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
            except OSError:
                continue
            if state != "Z":
                return False
        return True

    wait_for(all_gone, 15, "the killed workers to be gone")
    assert child_pids(server.proc.pid) == []


def crash_state(database: str, backend: str, into: Path) -> tuple[bool, dict[str, tuple[str, int]]]:
    """Return whether the committed state passes integrity_check, and its rows.

    The rows: key -> (value, revision).
    """
    sql = "SELECT key, value, revision FROM kv"
    if backend == "postgres":
        rows = stored(database, sql)
        integrity_ok = True  # PostgreSQL's own business
    else:
        conn = sqlite3.connect(copy_database(Path(database), into))
        try:
            integrity_ok = conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            rows = conn.execute(sql).fetchall()
        finally:
            conn.close()
    return integrity_ok, {key: (bytes(value).decode(), revision) for key, value, revision in rows}


def audit(integrity_ok: bool, rows: dict[str, tuple[str, int]], ledger: Ledger) -> dict:
    """Check the committed rows against the ledger; return the counts."""
    applied: dict[int, int] = {}  # tid -> the one revision of its K keys
    half_applied = []
    for tid in ledger.thread_of:
        found = [rows.get(f"t{tid}-{j}") for j in range(K)]
        if all(row is not None and row[0] == value_of(tid) for row in found):
            revisions = {row[1] for row in found}
            if len(revisions) == 1:
                applied[tid] = revisions.pop()
                continue
        if any(row is not None for row in found):
            half_applied.append(tid)
    # head<n> and the one marker d<tid> left of thread n name its latest applied transaction.
    stale_heads = 0
    markers = {int(key[1:]) for key in rows if key.startswith("d")}
    for thread_no in set(ledger.thread_of.values()):
        mine = [tid for tid in applied if ledger.thread_of[tid] == thread_no]
        latest = max(mine) if mine else None
        head = rows.get(f"head{thread_no}")
        expected_head = None if latest is None else (str(latest), applied[latest])
        expected_markers = set() if latest is None else {latest}
        left = {tid for tid in markers if ledger.thread_of.get(tid) == thread_no}
        if head != expected_head or left != expected_markers:
            stale_heads += 1
    known = {f"head{n}" for n in set(ledger.thread_of.values())}
    known |= {f"d{tid}" for tid in ledger.thread_of}
    known |= {f"t{tid}-{j}" for tid in ledger.thread_of for j in range(K)}
    acknowledged = ledger.acknowledged
    return {
        "integrity_ok": integrity_ok,
        "lost": len(set(acknowledged) - set(applied)),
        "half_applied": len(half_applied),
        "wrong_revision": sum(applied.get(tid, r) != r for tid, r in acknowledged.items()),
        "shared_revision": len(applied) - len(set(applied.values())),
        "stale_heads": stale_heads,
        "unknown_keys": len(set(rows) - known),
        "applied_unacknowledged": len(set(applied) - set(acknowledged)),
    }


@pytest.mark.backends("sqlite", "postgres")
def test_kill_9_under_concurrent_transactions_leaves_each_whole_or_absent(
    database, backend, server_factory, tmp_path, summary
):
    seed = int(os.environ.get("TXN_CRASH_SEED") or random.SystemRandom().randrange(2**32))
    rng = random.Random(seed)
    ledger = Ledger()
    rounds = []
    for round_no in range(ROUNDS):
        # From round 2 on: a restart on the crashed database.
        server = server_factory(args=("--workers", "2"), kind=KvappServer)
        workers = workers_of(server, 2)
        stop = threading.Event()
        threads = [
            threading.Thread(target=client_loop, args=(n, server.port, ledger, stop))
            for n in range(CLIENT_THREADS)
        ]
        acknowledged_before = len(ledger.acknowledged)
        for thread in threads:
            thread.start()
        time.sleep(rng.uniform(0.1, 0.8))
        kill_9(server, workers)  # no cleanup, no checkpoint, mid-commit for some
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        assert not any(thread.is_alive() for thread in threads)

        counts = audit(*crash_state(database, backend, tmp_path / "crash-state"), ledger)
        counts["acknowledged"] = len(ledger.acknowledged) - acknowledged_before
        rounds.append(counts)
        where = f"round {round_no + 1} (TXN_CRASH_SEED={seed})"
        assert not ledger.errors, f"{where}: {ledger.errors[:5]}"
        assert not ledger.refused, f"{where}: answers other than 200: {ledger.refused}"
        assert counts == {
            **counts,
            "integrity_ok": True,
            "lost": 0,
            "half_applied": 0,
            "wrong_revision": 0,
            "shared_revision": 0,
            "stale_heads": 0,
            "unknown_keys": 0,
        }, where

    # The last crash state, too, serves every acknowledged transaction after a restart.
    server = server_factory(args=("--workers", "2"), kind=KvappServer)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    sample = rng.sample(sorted(ledger.acknowledged), min(100, len(ledger.acknowledged)))
    for tid in sample:
        status, data = post(conn, {"then": [{"get": f"t{tid}-{j}"} for j in range(K)]})
        assert status == 200
        tag = etag(ledger.acknowledged[tid])
        assert json.loads(data)["results"] == [
            {"get": f"t{tid}-{j}", "found": True, "value": value_of(tid)}
            | {"content_type": TEXT, "etag": tag}
            for j in range(K)
        ]
    conn.close()
    assert server.stop() == 0

    acknowledged = sum(r["acknowledged"] for r in rounds)
    assert acknowledged > ROUNDS, "the rounds acknowledged almost nothing; nothing was tested"
    summary(
        f"[txn-crash {backend}] {ROUNDS} rounds of kill -9 (seed {seed}),"
        f" {CLIENT_THREADS} client threads, {K} keys + head + marker per txn:"
        f" {len(ledger.thread_of)} txns sent, {acknowledged} acknowledged, lost 0,"
        f" half-applied 0, {rounds[-1]['applied_unacknowledged']} committed but cut off"
        f" before the answer, integrity_check ok {ROUNDS}/{ROUNDS};"
        f" acknowledged per round {[r['acknowledged'] for r in rounds]}"
    )
