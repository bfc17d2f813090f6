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
from pathlib import Path

import pytest
from faultkit import Client
from helpers import stored
from ledgerkit import DEADLINE, UNKNOWN, Answer, Ledger, Writers, timed_get, wait_until, writer
from pgcluster import SUPERUSER, Cluster, find_bindir, running

pytestmark = pytest.mark.slow

STANDBY_NAME = "standby1"
WRITERS = 4
ROUNDS = 3
WRITE_BEFORE_KILL = 1.0  # seconds of writes on the primary before it is killed

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


@pytest.mark.parametrize("round_number", range(ROUNDS))
def test_failover_to_a_clean_promoted_standby_loses_nothing_and_writes_resume(
    pair, server_factory, round_number, summary
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
    summary(
        f"[failover {round_number}] {WRITERS} writers: {before} writes acknowledged before"
        f" the promotion, {after} after, 0 lost; first write acknowledged"
        f" {first.received - promoted:.2f} s after the promotion began"
        f" (pg_ctl promote took {promotion:.2f} s); {len(outage)} writes answered 503"
        f" from the kill to then ({len(refused)} in all: {dict(reasons)})"
    )


HANG_TIMEOUT = 2  # kvapp's database_timeout_seconds in the variant whose commits hang
HANG_WINDOW = 6.0  # seconds of hanging commits the variant watches
SLACK = 3.0  # seconds allowed on top of a bound, for a loaded machine


def test_failover_to_a_standby_whose_commits_hang_answers_503_in_time_and_keeps_reading(
    pair, server_factory, summary
):
    """The promoted standby keeps synchronous_standby_names: each COMMIT waits for ever.

    No HA manager empties it, so every commit on the new primary waits for
    a standby that no longer exists.  kvapp runs under waitress-serve's 4
    threads with 8 writers, more than its threads.  Within the bound,
    writes answer 503 (the stuck commits "may or may not be stored"), reads
    keep being answered, and /healthz says 503.  Once the setting is
    emptied, writes are acknowledged again by the same process.
    """
    primary, standby = pair
    name = primary.create_database().rpartition("/")[2]
    url = (
        f"postgresql://{SUPERUSER}@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/{name}"
        "?target_session_attrs=read-write"
    )
    server = server_factory(path=url, env={"KVAPP_DATABASE_TIMEOUT_SECONDS": str(HANG_TIMEOUT)})
    client = Client(server.port, timeout=DEADLINE)
    old = {f"old-{n}": f"value {n}".encode() for n in range(10)}
    for key, value in old.items():
        assert client.request("PUT", f"/kv/{key}", value)[0] == 201
    writers = Writers(server.port, 2 * WRITERS, prefix="w")
    try:
        wait_until(lambda: writers.ledger.acknowledged(), "a first write on the primary")
        time.sleep(WRITE_BEFORE_KILL)
        primary.stop("immediate")
        standby.promote()
        promoted = time.monotonic()
        # kvapp reads from the new primary, whose commits all hang
        wait_until(lambda: client.get("/kv/old-0")[0] == 200, "a read on the new primary")
        reads: list[tuple[int, bytes, float]] = []
        probes: list[tuple[int, bytes, float]] = []
        window = time.monotonic()
        while time.monotonic() - window < HANG_WINDOW:
            reads.append(timed_get(client, f"/kv/old-{len(reads) % 10}"))
            probes.append(timed_get(client, "/healthz"))
            time.sleep(0.1)
        stuck = time.monotonic()
        # The HA manager, late: no synchronous standby is left to wait for.
        with standby.admin() as conn:
            conn.execute("ALTER SYSTEM SET synchronous_standby_names = ''")
            conn.execute("SELECT pg_reload_conf()")
        released = time.monotonic()
        wait_until(
            lambda: any(a.sent > released for a in writers.ledger.acknowledged()),
            "a write acknowledged once commits no longer hang",
        )
        time.sleep(0.3)
    finally:
        ledger = writers.stop()
    client.close()

    answers = ledger.all()
    bound = HANG_TIMEOUT + 1 + SLACK  # the timeout, then 1 s for the cancel
    assert {a.status for a in answers} <= {201, 503}
    slow = [a for a in answers if a.seconds > bound]
    assert not slow, f"{len(slow)} writes took over {bound} s: {slow[:3]}"
    hung = [a for a in answers if promoted <= a.sent and a.received <= stuck]
    assert hung and not [a for a in hung if a.status == 201]
    unknown = [a for a in hung if UNKNOWN in a.body]
    # A leader's commit, cancelled by kvapp's watchdog: PostgreSQL kept it, with a WARNING.
    assert [a for a in unknown if b"gave up waiting for its synchronous standby" in a.body], (
        Counter(a.body for a in hung)
    )
    # Reads keep being answered, and quickly: the writes do not hold every thread.
    assert {status for status, _, _ in reads} == {200}, Counter(body for _, body, _ in reads)
    assert max(seconds for _, _, seconds in reads) < HANG_TIMEOUT + SLACK
    assert all(body == old[f"old-{n % 10}"] for n, (_, body, _) in enumerate(reads))
    assert {status for status, _, _ in probes} == {503}, probes[:3]
    assert max(seconds for _, _, seconds in probes) < 1 + SLACK

    rows = dict(stored(standby.url(name), "SELECT key, value FROM kv"))
    lost = [a.key for a in ledger.acknowledged() if rows.get(a.key) != a.key.encode()]
    assert not lost, f"{len(lost)} acknowledged writes lost: {lost[:10]}"
    leaked = [a.key for a in ledger.refused() if a.key in rows]
    assert not leaked, f"writes answered 'nothing was stored' are stored: {leaked[:10]}"
    assert server.proc.poll() is None

    kept = sum(a.key in rows for a in unknown)
    again = min(a.received for a in ledger.acknowledged() if a.sent > released) - released
    summary(
        f"[hanging standby] {2 * WRITERS} writers on 4 threads, {HANG_WINDOW:.0f} s of"
        f" commits that hang (database_timeout_seconds = {HANG_TIMEOUT}):"
        f" {len(hung)} writes answered 503 in at most {max(a.seconds for a in hung):.2f} s"
        f" ({len(unknown)} 'may or may not be stored', {kept} of them kept;"
        f" {len(hung) - len(unknown)} 'nothing was stored', in at most"
        f" {max((a.seconds for a in hung if a not in unknown), default=0):.2f} s);"
        f" {len(reads)} reads all 200 in at most {max(s for _, _, s in reads):.2f} s;"
        f" /healthz 503 in at most {max(s for _, _, s in probes):.2f} s; writes acknowledged"
        f" again {again:.2f}"
        " s after synchronous_standby_names was emptied; 0 lost"
    )
