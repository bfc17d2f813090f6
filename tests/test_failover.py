"""Failover to a synchronous standby: nothing acknowledged is lost, kvapp writes again unrestarted.

Each round starts two throwaway clusters on one machine, as an operator
would set them up:

- a primary with synchronous_standby_names = 'standby1', so that a COMMIT
  returns only once the standby has flushed its WAL;
- a standby cloned from it by pg_basebackup -R, streaming as standby1.

kvapp (waitress-serve wsgi:app, default settings) gets both in one libpq URL
with target_session_attrs=read-write, and 4 client threads PUT unique keys,
keeping a ledger of the writes answered 201.  Then the primary is killed
(pg_ctl stop -m immediate), the standby promoted, and, as an HA manager does
at promotion, its synchronous_standby_names emptied (the standby carries the
primary's settings, as a clone does: without that its commits would wait for
a standby that no longer exists).  The clients keep writing until writes are
acknowledged again.  Every acknowledged write must be on the promoted
standby, and the same kvapp process must write again.  A summary line gives
the figures: writes acknowledged before and after, seconds from the promotion
to the first acknowledged write, and the 503 answers in between.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from faultkit import Client
from helpers import stored
from pgcluster import SUPERUSER, Cluster, find_bindir, running

pytestmark = pytest.mark.slow

STANDBY_NAME = "standby1"
WRITERS = 4
ROUNDS = 3
WRITE_BEFORE_KILL = 1.0  # seconds of writes on the primary before it is killed
DEADLINE = 30.0  # seconds: for replication to start, and for writes to come back

# The primary's replication settings (PostgreSQL 15's defaults for the first
# two, stated because a standby needs them).  initdb --auth=trust already
# lets local TCP connections replicate (pg_hba.conf's "host replication all
# 127.0.0.1/32 trust"), and the bootstrap superuser may replicate.
PRIMARY = {
    "wal_level": "replica",
    "max_wal_senders": "4",
    "synchronous_standby_names": f"'{STANDBY_NAME}'",
}


class Standby(Cluster):
    """A hot standby of a running primary: cloned by pg_basebackup -R, streaming as STANDBY_NAME.

    It carries the primary's settings (synchronous_standby_names included),
    as a clone made by pg_basebackup does.
    """

    def __init__(self, bindir: Path, primary: Cluster) -> None:
        super().__init__(bindir, dict(primary.settings))
        self.primary = primary

    def init(self) -> Standby:
        """pg_basebackup -R: the primary's files, standby.signal and primary_conninfo."""
        conninfo = (
            f"host=127.0.0.1 port={self.primary.port} user={SUPERUSER}"
            f" application_name={STANDBY_NAME}"
        )
        self._run(
            str(self.bindir / "pg_basebackup"), "-D", str(self.data), "-d", conninfo, "-R",
            "-X", "stream", "--checkpoint=fast", "--no-sync",
        )  # fmt: skip
        # -R wrote primary_conninfo (with the application_name) to postgresql.auto.conf,
        # which start() rewrites: carry it over.
        written = (self.data / "postgresql.auto.conf").read_text()
        found = re.search(r"^primary_conninfo = ('.*')$", written, re.MULTILINE)
        assert found and f"application_name={STANDBY_NAME}" in found[1], written
        self.settings["primary_conninfo"] = found[1]
        assert (self.data / "standby.signal").exists()
        return self

    def promote(self) -> None:
        """pg_ctl promote, returning once the server accepts writes."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60", "promote")


def wait_until(condition, what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.05)


def sync_state(primary: Cluster) -> str | None:
    with primary.admin() as conn:
        row = conn.execute(
            "SELECT sync_state FROM pg_stat_replication WHERE application_name = %s",
            (STANDBY_NAME,),
        ).fetchone()
    return row and row[0]


@pytest.fixture
def pair():
    """A primary and its synchronous standby, streaming; both removed at the end, come what may."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL's initdb is not installed (apt-get install postgresql)")
    with contextlib.ExitStack() as stack:
        primary = stack.enter_context(running(Cluster(bindir, PRIMARY)))
        standby = stack.enter_context(running(Standby(bindir, primary)))
        try:
            wait_until(lambda: sync_state(primary) == "sync", "the standby streams as sync")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{primary.server_log()}\n{standby.server_log()}") from None
        yield primary, standby


@dataclass
class Answer:
    key: str
    status: int
    sent: float  # time.monotonic() when the request went out
    received: float  # and when its answer came back
    body: bytes


@dataclass
class Ledger:
    """Every answer of every writer, and what went wrong in a writer thread."""

    answers: list[Answer] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def acknowledged(self) -> list[Answer]:
        with self.lock:
            return [answer for answer in self.answers if answer.status == 201]


def writer(port: int, number: int, ledger: Ledger, stop: threading.Event) -> None:
    """PUT /kv/k-<number>-<n>, n = 0, 1, ... (each key once), until stop; record each answer."""
    client = Client(port, timeout=DEADLINE)
    try:
        for n in range(10**9):
            if stop.is_set():
                break
            key = f"k-{number}-{n}"
            sent = time.monotonic()
            status, _, body = client.request("PUT", f"/kv/{key}", key.encode())
            with ledger.lock:
                ledger.answers.append(Answer(key, status, sent, time.monotonic(), body))
            if status != 201:
                time.sleep(0.05)  # as a client backing off; 503s must not spin
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        with ledger.lock:
            ledger.errors.append(exc)
    finally:
        client.close()


@pytest.mark.parametrize("round_number", range(ROUNDS))
def test_failover_to_a_clean_promoted_standby_loses_nothing_and_writes_resume(
    pair, server_factory, round_number, capsys
):
    primary, standby = pair
    name = primary.create_database().rpartition("/")[2]  # replicated to the standby
    url = (
        f"postgresql://{SUPERUSER}@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/{name}"
        "?target_session_attrs=read-write"
    )
    server = server_factory(path=url)  # default settings; creates the schema on the primary
    pid = server.proc.pid
    ledger, stop = Ledger(), threading.Event()
    threads = [
        threading.Thread(target=writer, args=(server.port, number, ledger, stop))
        for number in range(WRITERS)
    ]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: ledger.acknowledged() or ledger.errors, "a first write on the primary")
        time.sleep(WRITE_BEFORE_KILL)
        kill = time.monotonic()
        primary.stop("immediate")  # a crash of the primary: its sessions are cut
        killed = time.monotonic()  # the primary's processes are gone
        assert not (primary.data / "postmaster.pid").exists()
        promoted = time.monotonic()
        standby.promote()
        promotion = time.monotonic() - promoted
        # What an HA manager does at promotion: no synchronous standby is left to wait for.
        with standby.admin() as conn:
            conn.execute("ALTER SYSTEM SET synchronous_standby_names = ''")
            conn.execute("SELECT pg_reload_conf()")

        # Writes sent once the primary was gone: acknowledged, they were committed on the
        # new primary (a write sent before may be answered late from the old one).
        def after_kill() -> list[Answer]:
            return [answer for answer in ledger.acknowledged() if answer.sent >= killed]

        try:
            wait_until(lambda: after_kill() or ledger.errors, "a write acknowledged after failover")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{server.output()[-3000:]}") from None
        time.sleep(0.3)  # a few more writes on the new primary
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=DEADLINE + 10)
    assert not any(thread.is_alive() for thread in threads)
    assert not ledger.errors, ledger.errors

    answers = ledger.answers
    assert {answer.status for answer in answers} <= {201, 503}, Counter(
        (answer.status, answer.body) for answer in answers if answer.status not in (201, 503)
    )
    acknowledged = {answer.key: answer for answer in answers if answer.status == 201}
    rows = dict(stored(standby.url(name), "SELECT key, value FROM kv"))
    lost = sorted(key for key in acknowledged if rows.get(key) != key.encode())
    assert not lost, f"{len(lost)} acknowledged writes lost: {lost[:10]}"
    assert stored(standby.url(name), "SELECT pg_is_in_recovery()") == [(False,)]

    first = min(after_kill(), key=lambda answer: answer.received)
    before = sum(answer.received < promoted for answer in acknowledged.values())
    after = len(acknowledged) - before
    refused = [answer for answer in answers if answer.status == 503]
    # 503s between the kill and the first write acknowledged after it
    outage = [answer for answer in refused if kill <= answer.received <= first.received]
    reasons = Counter(answer.body.decode().strip() for answer in refused)
    assert before > 0 and after > 0

    # The same kvapp process serves: reads of keys written before, and new writes.
    assert server.proc.poll() is None and server.proc.pid == pid
    client = Client(server.port, timeout=DEADLINE)
    try:
        old = min(acknowledged.values(), key=lambda answer: answer.received).key
        assert client.get(f"/kv/{old}")[::2] == (200, old.encode())
        assert client.request("PUT", "/kv/after-failover", b"new")[0] == 201
        assert client.get("/kv/after-failover")[::2] == (200, b"new")
    finally:
        client.close()
    assert stored(standby.url(name), "SELECT value FROM kv WHERE key = 'after-failover'") == [
        (b"new",)
    ]
    with capsys.disabled():
        print(
            f"\n[failover {round_number}] {WRITERS} writers: {before} writes acknowledged before"
            f" the promotion, {after} after, 0 lost; first write acknowledged"
            f" {first.received - promoted:.2f} s after the promotion began"
            f" (pg_ctl promote took {promotion:.2f} s); {len(outage)} writes answered 503"
            f" from the kill to then ({len(refused)} in all: {dict(reasons)})"
        )
