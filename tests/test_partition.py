"""A network partition between kvapp and PostgreSQL: bounded answers, nothing lost, service resumes.

kvapp (waitress-serve wsgi:app, database_timeout_seconds = 2) reaches its
PostgreSQL server through tests/tcpproxy.py, which can stop forwarding
without closing anything, as a partition that drops packets does.  Writer
threads keep a ledger of every answer.  Each test checks:
- every answer came within the bound: database_timeout_seconds, plus 1 s
  for the cancel request, plus SLACK for a loaded machine;
- every acknowledged write is stored, and no write answered "nothing was
  stored" is;
- once the network heals, the same kvapp process writes and reads again.
A summary line per test gives the measured figures.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
from faultkit import Client
from helpers import stored
from ledgerkit import DEADLINE, Ledger, Writers, timed_get, wait_until
from tcpproxy import Proxy

pytestmark = [pytest.mark.backends("postgres"), pytest.mark.slow]

TIMEOUT = 2  # database_timeout_seconds
SLACK = 3.0
BOUND = TIMEOUT + 1 + SLACK
WRITERS = 4
CUT = 5.0  # seconds the network stays cut


@pytest.fixture
def cut_off(database, pg_cluster, server_factory):
    """(kvapp's server, the proxy in front of its database, the database's own URL)."""
    proxy = Proxy(pg_cluster.port).start()
    try:
        server = server_factory(
            path=proxy.url(database), env={"KVAPP_DATABASE_TIMEOUT_SECONDS": str(TIMEOUT)}
        )
        yield server, proxy, database
    finally:
        proxy.stop()


def check_ledger(ledger: Ledger, url: str) -> dict[str, bytes]:
    """Assert what every class of answer promises of the database; return its rows."""
    answers = ledger.all()
    assert {a.status for a in answers} <= {201, 503}, Counter(a.status for a in answers)
    slow = [a for a in answers if a.seconds > BOUND]
    assert not slow, f"{len(slow)} writes took over {BOUND} s: {slow[:3]}"
    rows = dict(stored(url, "SELECT key, value FROM kv"))
    lost = [a.key for a in ledger.acknowledged() if rows.get(a.key) != a.key.encode()]
    assert not lost, f"{len(lost)} acknowledged writes lost: {lost[:10]}"
    leaked = [a.key for a in ledger.refused() if a.key in rows]
    assert not leaked, f"writes answered 'nothing was stored' are stored: {leaked[:10]}"
    unexplained = [a for a in answers if a.status == 503 and a not in ledger.refused()]
    assert unexplained == ledger.unknown(), Counter(a.body for a in unexplained)
    return rows


def heal(proxy: Proxy, ledger: Ledger) -> tuple[float, float]:
    """Heal the network; return when, and how long until a write sent after was acknowledged."""
    proxy.heal()
    healed = time.monotonic()
    wait_until(
        lambda: any(a.sent > healed for a in ledger.acknowledged()), "a write after the heal"
    )
    again = min(a.received for a in ledger.acknowledged() if a.sent > healed) - healed
    time.sleep(0.3)  # a few more writes
    return healed, again


def test_a_partition_while_idle_answers_503_in_time_and_service_resumes(cut_off, summary):
    server, proxy, url = cut_off
    client = Client(server.port, timeout=DEADLINE)
    assert client.request("PUT", "/kv/before", b"old")[0] == 201
    proxy.drop()  # kvapp's pooled connections are idle: nothing is lost in flight
    cut = time.monotonic()
    writers = Writers(server.port, WRITERS)
    reads, probes = [], []
    try:
        while time.monotonic() - cut < CUT:
            reads.append(timed_get(client, "/kv/before"))
            probes.append(timed_get(client, "/healthz"))
        healed, again = heal(proxy, writers.ledger)
    finally:
        ledger = writers.stop()
    during = [a for a in ledger.all() if a.received < healed]
    assert during and {a.status for a in during} == {503}
    assert {status for status, _, _ in reads} == {503}
    assert max(seconds for _, _, seconds in reads) < BOUND
    assert {status for status, _, _ in probes} == {503}
    assert max(seconds for _, _, seconds in probes) < 2 + SLACK
    rows = check_ledger(ledger, url)
    # The network was cut before any COMMIT went out.  The writes of a batch that was
    # waiting could not know that, and may say "may or may not": none of them is stored.
    assert not [a.key for a in ledger.unknown() if a.key in rows]
    assert client.get("/kv/before")[::2] == (200, b"old")
    assert client.get("/healthz")[0] == 200
    client.close()
    summary(
        f"[partition while idle] {CUT:.0f} s cut off, {WRITERS} writers:"
        f" {len(during)} writes answered 503 in at most {max(a.seconds for a in during):.2f} s"
        f" ({Counter(a.body.decode().strip() for a in during).most_common(3)});"
        f" {len(reads)} reads 503 in at most {max(s for _, _, s in reads):.2f} s;"
        f" /healthz 503 in at most {max(s for _, _, s in probes):.2f} s;"
        f" writes acknowledged again {again:.2f} s after the heal; 0 lost"
    )


@pytest.mark.parametrize("delivered", [False, True], ids=["commit-lost", "answer-lost"])
def test_a_partition_in_the_middle_of_a_commit_is_reported_as_unknown(cut_off, delivered, summary):
    """commit-lost: the COMMIT never reaches the server; answer-lost: it does, its answer not."""
    server, proxy, url = cut_off
    writers = Writers(server.port, WRITERS)
    try:
        wait_until(lambda: writers.ledger.acknowledged(), "a first acknowledged write")
        proxy.drop_at_commit(deliver=delivered)
        assert proxy.triggered.wait(DEADLINE)
        cut = time.monotonic()
        time.sleep(CUT)
        healed, again = heal(proxy, writers.ledger)
    finally:
        ledger = writers.stop()
    rows = check_ledger(ledger, url)
    # The writes of the cut commit's batch are in doubt, and said so; the database then
    # holds all of them (answer-lost) or none (commit-lost).  A batch that began during
    # the cut may say so too, but its COMMIT never went out.
    doubtful = [a for a in ledger.unknown() if a.sent <= cut]
    assert doubtful, Counter(a.body for a in ledger.all() if a.status == 503)
    # Only a write sent before the heal can be in doubt.  Its answer may come after it: a
    # COMMIT sent in the last database_timeout_seconds of the cut waits out that timeout.
    assert all(a.sent < healed for a in ledger.unknown())
    assert [a.key in rows for a in doubtful] == [delivered] * len(doubtful)
    assert not [a.key for a in ledger.unknown() if a.sent > cut and a.key in rows]
    during = [a for a in ledger.all() if cut <= a.sent and a.received < healed]
    assert during and {a.status for a in during} == {503}
    summary(
        f"[partition mid-commit, {'answer' if delivered else 'commit'} lost] {WRITERS}"
        f" writers: {len(doubtful)} writes answered 'may or may not be stored' in at most"
        f" {max(a.seconds for a in doubtful):.2f} s, {'all' if delivered else 'none'} of"
        f" them stored; {len(during)} more answered 503 'nothing was stored' in at most"
        f" {max(a.seconds for a in during):.2f} s; writes acknowledged again {again:.2f} s"
        " after the heal; 0 lost"
    )
