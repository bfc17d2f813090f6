"""A disk that stops answering under SQLite: writes fail in time, reads go on, nothing is lost.

No timeout of SQLite or of Python can end an fsync that does not return (a
dying disk, a hung network filesystem).  What kvapp can bound is everything
else: once a commit is busy_timeout_ms + 1 s old, only its leader's thread
waits for the disk.  The other writes of that commit answer 503 "may or may
not be stored", the writes queued behind it and every new one 503 "nothing
was stored", and the other threads serve reads.  The database
lives on tests/powercut.py, frozen: its fsyncs wait until it is thawed.
kvapp runs under waitress-serve's 4 threads with 8 writers, more than its
threads, and busy_timeout_ms = 500.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from faultkit import Client
from helpers import Server
from ledgerkit import DEADLINE, Writers, timed_get, wait_until
from powerkit import Disk, needs_fuse

pytestmark = [pytest.mark.slow, needs_fuse]

BUSY_MS = 500
SLACK = 3.0
BOUND = BUSY_MS / 1000 + 1 + SLACK  # the busy timeout, then 1 s of a stalled commit
FROZEN = 5.0  # seconds the disk hangs
THREADS = 4  # waitress-serve's default


def open_every_threads_reader(port: int) -> None:
    """Make each waitress thread read once, so that each has opened its SQLite connection.

    A FUSE filesystem holds the file's inode lock through all of an fsync
    (fuse_fsync in the kernel), and SQLite running as root fchowns the WAL
    each time a connection opens it: a connection opened while the disk is
    frozen would wait for the lock.  (ext4 holds no such lock while it
    waits for its journal.)  THREADS long-polls at once occupy every
    thread, and each reads the key first.
    """
    client = Client(port)
    status, headers, _ = client.get("/kv/old-0")
    client.close()
    assert status == 200
    wait = {"If-None-Match": headers["etag"], "Prefer": "wait=1"}

    def poll() -> None:
        client = Client(port, timeout=DEADLINE)
        try:
            assert client.request("GET", "/kv/old-0", headers=wait)[0] == 304
        finally:
            client.close()

    polls = [threading.Thread(target=poll) for _ in range(THREADS)]
    for poll in polls:
        poll.start()
    for poll in polls:
        poll.join(DEADLINE)


def test_a_hung_disk_fails_queued_writes_in_time_and_reads_go_on(tmp_path: Path, summary):
    disk = Disk(tmp_path / "disk", tmp_path / "mnt", tmp_path / "powercut.log").mount()
    database = disk.mountpoint / "kv.sqlite3"
    env = {
        "KVAPP_BUSY_TIMEOUT_MS": str(BUSY_MS),
        "KVAPP_ACCESS_LOG": "false",
        "KVAPP_METRICS_PATH": str(tmp_path / "metrics.sqlite3"),  # off the frozen disk
        "KVAPP_MAX_WATCHERS": str(THREADS),
        # Every read goes to SQLite, none is answered from kvapp's cache.
        "KVAPP_READ_CACHE_BYTES": "0",
    }
    server = Server(database, env, log_path=tmp_path / "server.log").start()
    client = Client(server.port, timeout=DEADLINE)
    try:
        old = {f"old-{n}": f"value {n}".encode() for n in range(10)}
        for key, value in old.items():
            assert client.request("PUT", f"/kv/{key}", value)[0] == 201
        open_every_threads_reader(server.port)
        writers = Writers(server.port, 8)
        try:
            wait_until(lambda: writers.ledger.acknowledged(), "a first acknowledged write")
            disk.freeze()
            thawed = float("inf")
            frozen = time.monotonic()
            reads, probes = [], []
            while time.monotonic() - frozen < FROZEN:
                reads.append(timed_get(client, f"/kv/old-{len(reads) % 10}"))
                probes.append(timed_get(client, "/healthz"))
                time.sleep(0.1)
            disk.thaw()
            thawed = time.monotonic()
            wait_until(
                lambda: any(a.sent > thawed for a in writers.ledger.acknowledged()),
                "a write once the disk answers again",
            )
        finally:
            if thawed == float("inf"):
                disk.thaw()  # the writers must end however this test fails
            ledger = writers.stop()
        assert client.get("/healthz")[0] == 200
    finally:
        client.close()
        server.kill()
        disk.close()
    disk.mount()
    try:
        conn = sqlite3.connect(database)
        rows = dict(conn.execute("SELECT key, value FROM kv"))
        conn.close()
    finally:
        disk.close()

    answers = ledger.all()
    assert {a.status for a in answers} <= {201, 503}
    # Writes sent while the disk hung and answered before it came back: 503, in time.
    during = [a for a in answers if frozen < a.sent and a.received < thawed]
    assert during and {a.status for a in during} == {503}, Counter(a.status for a in during)
    slow = [a for a in during if a.seconds > BOUND]
    assert not slow, f"{len(slow)} writes took over {BOUND} s: {slow[:3]}"
    # The writes of the commit that waited for the disk: its leader's thread waited, and
    # was answered once the disk came back; the others stopped waiting, their outcome unknown.
    waited = [a for a in answers if a.sent < thawed - FROZEN / 2 and a.received > thawed]
    assert [a.status for a in waited] == [201]
    unknown = ledger.unknown()
    assert all(a.sent < frozen + BOUND and a.seconds < BOUND for a in unknown), unknown
    assert {status for status, _, _ in reads} == {200}, Counter(body for _, body, _ in reads)
    assert all(body == old[f"old-{n % 10}"] for n, (_, body, _) in enumerate(reads))
    assert max(seconds for _, _, seconds in reads) < BOUND
    assert {status for status, _, _ in probes} == {503}, probes[:3]
    assert max(seconds for _, _, seconds in probes) < BOUND
    lost = [a.key for a in ledger.acknowledged() if rows.get(a.key) != a.key.encode()]
    assert not lost, f"{len(lost)} acknowledged writes lost: {lost[:10]}"
    leaked = [a.key for a in ledger.refused() if a.key in rows]
    assert not leaked, f"writes answered 'nothing was stored' are stored: {leaked[:10]}"
    # The unknown were in the frozen commit, which went through once the disk answered.
    assert all(rows.get(a.key) == a.key.encode() for a in unknown)
    longest = max((a.seconds for a in unknown), default=0)
    summary(
        f"[disk hang] 8 writers on 4 threads, fsync frozen {FROZEN:.0f} s"
        f" (busy_timeout_ms = {BUSY_MS}): {len(during)} writes answered 503 in at most"
        f" {max(a.seconds for a in during):.2f} s"
        f" ({Counter(a.body.decode().strip() for a in during).most_common(2)});"
        f" the frozen commit: its leader answered 201 once thawed, {len(unknown)} more"
        f" 'may or may not be stored' in at most {longest:.2f} s"
        " (stored);"
        f" {len(reads)} reads all 200 in at most {max(s for _, _, s in reads):.2f} s;"
        f" /healthz 503 in at most {max(s for _, _, s in probes):.2f} s; 0 lost"
    )
