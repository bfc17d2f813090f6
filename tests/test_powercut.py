"""Power cuts under concurrent writes through real waitress, on a filesystem that forgets.

kill -9 leaves the kernel's page cache alone, so test_crash.py would pass even
if kvapp never called fsync.  Here the database lives on tests/powercut.py, a
FUSE filesystem that keeps what was not fsynced in its own memory: pulling
its plug loses that (all of it, a random half of its pages, or all but the
first sectors of one page), as a power cut loses the page cache.

Each round: `waitress-serve wsgi:app` on the files the last cut left (so
every round also proves the server starts on them), 6 clients sending
multi-pair /set requests, PUTs and transactions of two puts, with a ledger
of what was acknowledged,
the plug pulled at a random moment, the server killed, the filesystem
remounted on what its disk kept.  Then PRAGMA integrity_check must be ok,
no request may be there in part, and with synchronous = FULL every
acknowledged request must be there; with NORMAL the test counts what was
lost (docs/guarantees.md gives the figures).

POWERCUT_ROUNDS (default 21: 7 of each variant) and POWERCUT_SEED make a
run longer or repeat one; the seed of every run is printed.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import Server
from powerkit import VARIANTS, Disk, needs_fuse

pytestmark = [pytest.mark.slow, needs_fuse]

ROUNDS = int(os.environ.get("POWERCUT_ROUNDS", "21"))
CLIENTS = 6


@dataclass
class Ledger:
    """Every request sent, by id: its keys and values, and whether it was acknowledged."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: dict[str, dict[str, str]] = field(default_factory=dict)
    acknowledged: set[str] = field(default_factory=set)
    unexpected: list[bytes] = field(default_factory=list)

    def new(self, rid: str, pairs: dict[str, str]) -> None:
        with self.lock:
            self.sent[rid] = pairs


def writer(number: int, port: int, round_no: int, ledger: Ledger, stop: threading.Event) -> None:
    """Take turns: a /set of 3 keys, a PUT of 1, a /txn of 2 puts; until the power goes."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    sequence = 0
    try:
        while not stop.is_set():
            sequence += 1
            rid = f"{round_no}.{number}.{sequence}"
            pad = "x" * (sequence * 131 % 3000)  # values of varied size: commits span pages
            headers = {}
            if sequence % 3 == 0:
                pairs = {f"s{rid}.{slot}": f"{rid}.{slot}.{pad}" for slot in "abc"}
                ledger.new(rid, pairs)
                query = "&".join(f"{key}={value}" for key, value in pairs.items())
                request = ("GET", f"/set?{query}", None)
            elif sequence % 3 == 1:
                pairs = {f"p{rid}": f"{rid}.{pad}"}
                ledger.new(rid, pairs)
                request = ("PUT", f"/kv/p{rid}", pairs[f"p{rid}"].encode())
            else:
                pairs = {f"t{rid}.{slot}": f"{rid}.{slot}.{pad}" for slot in "ab"}
                ledger.new(rid, pairs)
                puts = [{"put": key, "value": value} for key, value in pairs.items()]
                document = {"if": [{"key": f"t{rid}.a", "exists": False}], "then": puts}
                request = ("POST", "/txn", json.dumps(document).encode())
                headers = {"Content-Type": "application/json"}
            try:
                conn.request(request[0], request[1], body=request[2], headers=headers)
                response = conn.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException):
                return  # the power went mid-request: its outcome is unknown
            if response.status in (200, 201):
                if request[1] == "/txn" and b'"succeeded": true' not in body:
                    ledger.unexpected.append(body)  # its key cannot exist: it must succeed
                    continue
                with ledger.lock:
                    ledger.acknowledged.add(rid)
    finally:
        conn.close()


def audit(database: Path, ledger: Ledger) -> tuple[list[str], list[str], int]:
    """Return (acknowledged requests lost, requests found in part, keys kept) after a cut."""
    conn = sqlite3.connect(database, isolation_level=None)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        stored = dict(conn.execute("SELECT key, CAST(value AS TEXT) FROM kv"))
    finally:
        conn.close()
    lost, torn = [], []
    for rid, pairs in ledger.sent.items():
        present = [stored.get(key) == value for key, value in pairs.items()]
        if any(present) and not all(present):
            torn.append(rid)
        if rid in ledger.acknowledged and not all(present):
            lost.append(rid)
    return lost, torn, len(stored)


@needs_fuse
@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
def test_power_cuts_under_writes(tmp_path: Path, synchronous: str):
    seed = int(os.environ.get("POWERCUT_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    disk = Disk(tmp_path / "disk", tmp_path / "mnt", tmp_path / "powercut.log")
    database = disk.mountpoint / "kv.sqlite3"
    ledger = Ledger()
    figures = {variant: [0, 0, 0] for variant in VARIANTS}  # cuts, acknowledged, lost
    env = {"KVAPP_SYNCHRONOUS": synchronous, "KVAPP_ACCESS_LOG": "false"}
    disk.mount()
    server: Server | None = None
    try:
        for round_no in range(ROUNDS):
            variant = VARIANTS[round_no % len(VARIANTS)]
            server = Server(database, env, log_path=tmp_path / f"server-{round_no}.log")
            server.start()  # on the files the last cut left
            acknowledged_before = len(ledger.acknowledged)
            stop = threading.Event()
            threads = [
                threading.Thread(target=writer, args=(n, server.port, round_no, ledger, stop))
                for n in range(CLIENTS)
            ]
            for thread in threads:
                thread.start()
            time.sleep(rng.uniform(0.3, 1.2))
            disk.pull(variant, rng.randrange(2**32))
            server.kill()
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
            disk.unmount()
            disk.mount()
            lost, torn = audit(database, ledger)[:2]
            assert torn == [], f"round {round_no} ({variant}, seed {seed}): in part: {torn[:5]}"
            if synchronous == "FULL":
                assert lost == [], f"round {round_no} ({variant}, seed {seed}): lost {lost[:5]}"
            figures[variant][0] += 1
            figures[variant][1] += len(ledger.acknowledged) - acknowledged_before
            figures[variant][2] += len(lost)
            # Lost requests are reported once: forget them before the next round.
            for rid in lost:
                ledger.acknowledged.discard(rid)
        server = Server(database, env, log_path=tmp_path / "server-last.log").start()
        assert http_get(server.port, "/healthz") == (200, b"ok\n")
    finally:
        if server is not None:
            server.kill()
        disk.close()
    total = [sum(column) for column in zip(*figures.values(), strict=True)]
    print(
        f"\n[powercut {synchronous}] seed {seed}: {total[0]} cuts, {total[1]} writes"
        f" acknowledged, {total[2]} lost; by variant (cuts, acknowledged, lost): {figures}"
    )
    assert total[1] > ROUNDS  # the clients did write in the rounds
    assert ledger.unexpected == []


def http_get(port: int, target: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()
