"""kill -9 at random moments under concurrent multi-pair writes through real waitress.

Each round starts `waitress-serve wsgi:app` on the database the previous round
crashed (so every round also proves the server restarts on it), lets several
client threads send multi-pair /set requests, and SIGKILLs the server at a
random moment.  Then a copy of the files (the crash state, untouched for the
next round's restart) must hold every acknowledged request, no request in
part, and pass PRAGMA integrity_check.

The writes go through group commit: just before each kill the test scrapes
/metrics (which saves the process's counts), and at the end it prints the
distribution of commit batch sizes and checks that batches of several
requests happened, so the rounds crashed batched commits.

CRASH_ROUNDS (default 12) and CRASH_SEED make a run longer or
repeat one; the seed of every run is printed.
"""

from __future__ import annotations

import http.client
import os
import random
import re
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from faultkit import Client
from helpers import copy_database

pytestmark = pytest.mark.slow

ROUNDS = int(os.environ.get("CRASH_ROUNDS", "12"))
CLIENT_THREADS = 6
SLOTS = ("a", "b", "c")


def request_pairs(rid: int, thread_no: int) -> list[tuple[str, str]]:
    """Return the pairs request rid sets: three keys of its own, plus its thread's latest."""
    pad = "x" * (rid * 37 % 400)  # values of varied size, so commits span pages
    return [(f"r{rid}.{slot}", f"{rid}.{slot}.{pad}") for slot in SLOTS] + [
        (f"t{thread_no}", str(rid))
    ]


@dataclass
class Ledger:
    """What the clients sent and what the server acknowledged, across all rounds."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    next_rid: int = 0
    thread_of: dict[int, int] = field(default_factory=dict)  # every request sent
    acknowledged: set[int] = field(default_factory=set)  # 200 "stored 4 keys"
    refused: dict[int, int] = field(default_factory=dict)  # any other answer: rid -> status

    def new_request(self, thread_no: int) -> int:
        with self.lock:
            rid = self.next_rid
            self.next_rid += 1
            self.thread_of[rid] = thread_no
            return rid


def client_loop(thread_no: int, port: int, ledger: Ledger, stop: threading.Event) -> None:
    """Send multi-pair writes on one keep-alive connection until the server dies."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        while not stop.is_set():
            rid = ledger.new_request(thread_no)
            query = "&".join(f"{key}={value}" for key, value in request_pairs(rid, thread_no))
            try:
                conn.request("GET", f"/set?{query}")
                response = conn.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException):
                return  # killed mid-request: this one's outcome is unknown
            with ledger.lock:
                if (response.status, body) == (200, b"stored 4 keys\n"):
                    ledger.acknowledged.add(rid)
                else:
                    ledger.refused[rid] = response.status
    finally:
        conn.close()


def audit(db: Path, ledger: Ledger) -> dict[str, int]:
    """Check the database against the ledger; return the counts."""
    conn = sqlite3.connect(db)
    try:
        integrity = conn.execute("PRAGMA integrity_check").fetchall()
        rows = dict(conn.execute("SELECT key, CAST(value AS TEXT) FROM kv"))
    finally:
        conn.close()
    applied: set[int] = set()
    half_applied: list[int] = []
    for rid, thread_no in ledger.thread_of.items():
        expected = request_pairs(rid, thread_no)[: len(SLOTS)]
        present = sum(rows.get(key) == value for key, value in expected)
        if present == len(SLOTS):
            applied.add(rid)
        elif present or any(key in rows for key, _ in expected):
            half_applied.append(rid)
    # Each thread sends one request at a time, so its key t<n> must name its
    # latest applied request: a request is all-or-nothing across all 4 keys.
    stale_latest = 0
    for thread_no in set(ledger.thread_of.values()):
        mine = [rid for rid in applied if ledger.thread_of[rid] == thread_no]
        if rows.get(f"t{thread_no}") != (str(max(mine)) if mine else None):
            stale_latest += 1
    known = {key for rid, t in ledger.thread_of.items() for key, _ in request_pairs(rid, t)}
    return {
        "integrity_ok": integrity == [("ok",)],
        "lost": len(ledger.acknowledged - applied),
        "half_applied": len(half_applied),
        "stale_latest": stale_latest,
        "refused_but_stored": len(set(ledger.refused) & applied),
        "unknown_keys": len(set(rows) - known),
        "applied_unacknowledged": len(applied - ledger.acknowledged),
    }


def test_kill_9_under_concurrent_multi_pair_writes_loses_nothing(
    db_path, server_factory, tmp_path, summary
):
    seed = int(os.environ.get("CRASH_SEED") or random.SystemRandom().randrange(2**32))
    rng = random.Random(seed)
    ledger = Ledger()
    rounds = []
    for round_no in range(ROUNDS):
        server = server_factory()  # from round 2 on: a restart on the crashed files
        stop = threading.Event()
        threads = [
            threading.Thread(target=client_loop, args=(n, server.port, ledger, stop))
            for n in range(CLIENT_THREADS)
        ]
        acknowledged_before = len(ledger.acknowledged)
        for thread in threads:
            thread.start()
        time.sleep(rng.uniform(0.05, 0.6))
        # Saves this process's metrics so far (the batch sizes), under load.
        scraper = Client(server.port)
        assert scraper.get("/metrics")[0] == 200
        scraper.close()
        server.proc.kill()  # SIGKILL: no cleanup, no checkpoint, mid-commit for some
        server.proc.wait(timeout=15)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        assert not any(thread.is_alive() for thread in threads)

        counts = audit(copy_database(db_path, tmp_path / "crash-state"), ledger)
        counts["acknowledged"] = len(ledger.acknowledged) - acknowledged_before
        rounds.append(counts)
        assert counts == {
            **counts,
            "integrity_ok": True,
            "lost": 0,
            "half_applied": 0,
            "stale_latest": 0,
            "refused_but_stored": 0,
            "unknown_keys": 0,
        }, f"round {round_no + 1} (CRASH_SEED={seed})"
        assert not ledger.refused, f"answers other than 200 under plain load: {ledger.refused}"

    # The last crash state, too, serves every acknowledged write after a restart.
    server = server_factory()
    client = Client(server.port)
    sample = rng.sample(sorted(ledger.acknowledged), min(200, len(ledger.acknowledged)))
    for rid in sample:
        key, value = request_pairs(rid, ledger.thread_of[rid])[0]
        assert client.get(f"/get?key={key}")[::2] == (200, value.encode())
    batches = batch_sizes(client.get("/metrics")[2].decode())
    client.close()
    server.stop()

    acknowledged = sum(r["acknowledged"] for r in rounds)
    assert acknowledged > ROUNDS, "the rounds acknowledged almost nothing; nothing was tested"
    # Six clients against four server threads: commits must have carried several requests.
    assert sum(count for bound, count in batches.items() if bound != "1") > 0, batches
    summary(
        f"[crash] {ROUNDS} rounds of kill -9 (seed {seed}), {CLIENT_THREADS} client threads,"
        f" 4 pairs per request: {len(ledger.thread_of)} requests sent,"
        f" {acknowledged} acknowledged, lost 0, half-applied 0,"
        f" {rounds[-1]['applied_unacknowledged']} committed but cut off before"
        f" the answer, integrity_check ok {ROUNDS}/{ROUNDS};"
        f" acknowledged per round {[r['acknowledged'] for r in rounds]};"
        f" commits by batch size (requests per commit, up to): {batches}"
    )


def batch_sizes(metrics: str) -> dict[str, int]:
    """Return the commits per batch-size bucket ('1', '2', '4', ...) from a /metrics page."""
    cumulative = {
        bound: int(float(count))
        for bound, count in re.findall(
            r'^kvapp_commit_batch_size_bucket\{le="([^"]+)"\} (\S+)$', metrics, re.MULTILINE
        )
    }
    sizes, below = {}, 0
    for bound, count in cumulative.items():
        if count > below:
            sizes[bound] = count - below
        below = count
    return sizes
