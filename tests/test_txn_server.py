"""POST /txn end to end: concurrent transactions through real servers, and their events.

`python -m kvapp serve --workers 2` runs on an SQLite file or a PostgreSQL
database, and 16 client threads drive it over keep-alive HTTP connections,
so transactions from two processes meet in one store:

- a counter incremented by read-modify-write transactions (read, then put
  if the ETag still holds, else retry) loses no increment, and of 16
  clients that read one version and write on it, exactly one wins;
- two balances moved between by transfers conditioned on both ETags keep
  their sum in every consistent read, and the transfers that succeeded form
  one chain (each read the state the previous one wrote): serializable;
- one transaction's changes are one revision on the change stream.

Nothing is timed: every wait has a deadline of several seconds.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
from collections.abc import Callable
from typing import Any

import pytest
from helpers import KvappServer, curl
from test_watch_server import Watch, revision_of
from workerkit import workers_of

pytestmark = pytest.mark.slow

CLIENTS = 16
JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
OCTETS = "application/octet-stream"


class TxnClient:
    """One keep-alive connection: POST /txn and plain GETs."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def request(
        self, method: str, target: str, body: bytes | None = None, headers: dict | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        self.conn.request(method, target, body=body, headers=headers or {})
        response = self.conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data

    def txn(self, document: dict[str, Any]) -> dict[str, Any]:
        """Send one transaction; return its answer, which must be a 200."""
        body = json.dumps(document).encode()
        status, headers, data = self.request("POST", "/txn", body, {"Content-Type": JSON})
        assert (status, headers.get("content-type")) == (200, JSON), (status, data)
        return json.loads(data)

    def close(self) -> None:
        self.conn.close()


def start(server_factory) -> KvappServer:
    """Start `python -m kvapp serve --workers 2` and wait for both workers."""
    server = server_factory(args=("--workers", "2"), kind=KvappServer)
    workers_of(server, 2)
    return server


def run_clients(count: int, body: Callable[[int], None]) -> None:
    """Run body(0) ... body(count - 1) in threads at once; re-raise the first error."""
    errors: list[BaseException] = []

    def run(number: int) -> None:
        try:
            body(number)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a client thread hung"
    if errors:
        raise errors[0]


def etag(revision: int) -> str:
    return f'"{revision}"'


# -- a counter: read, then put if unchanged ----------------------------------------

INCREMENTS = 25  # successful increments per client


class Counter:
    """What the counter's clients saw, across all threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.written: list[tuple[int, int]] = []  # (revision, value) of every put that won
        self.conflicts = 0  # transactions answered succeeded=false
        self.first_round_wins = 0


def read_counter(client: TxnClient, through_txn: bool) -> tuple[int, str | None]:
    """Return the counter's value and ETag (0 and None while it is absent).

    through_txn: by a transaction's get; else by GET /kv/n, which the
    serving process may answer from its read cache.
    """
    if through_txn:
        answer = client.txn({"then": [{"get": "n"}]})
        assert answer["succeeded"] is True
        (result,) = answer["results"]
        if not result["found"]:
            assert result == {"get": "n", "found": False}
            return 0, None
        assert result["content_type"] == TEXT
        return int(result["value"]), result["etag"]
    status, headers, body = client.request("GET", "/kv/n")
    if status == 404:
        return 0, None
    assert status == 200, (status, body)
    return int(body), headers["etag"]


def try_increment(client: TxnClient, value: int, tag: str | None, counter: Counter) -> bool:
    """Put value + 1 if the counter is still at tag; return whether it was."""
    condition = {"key": "n", "exists": False} if tag is None else {"key": "n", "etag": tag}
    answer = client.txn({"if": [condition], "then": [{"put": "n", "value": str(value + 1)}]})
    with counter.lock:
        if not answer["succeeded"]:
            counter.conflicts += 1
            assert answer["results"] == [], answer  # no else: nothing to answer
            return False
        revision = answer["revision"]
        assert answer["results"] == [
            {"put": "n", "etag": etag(revision), "created": tag is None}
        ], f"a put conditioned on {condition} answered {answer}"
        counter.written.append((revision, value + 1))
        return True


@pytest.mark.backends("sqlite", "postgres")
def test_read_modify_write_increments_from_16_clients_lose_nothing(server_factory, backend):
    """Half the clients read by a txn get, half by GET /kv/n (maybe cached); none loses a write.

    First round: all 16 read the absent counter, wait for each other, then
    each sends a put conditioned on exists=false: exactly one may win.  Then
    each client increments until INCREMENTS of its own have succeeded.
    """
    server = start(server_factory)
    counter = Counter()
    barrier = threading.Barrier(CLIENTS, timeout=60)

    def client_body(number: int) -> None:
        client = TxnClient(server.port)
        through_txn = number % 2 == 0
        try:
            value, tag = read_counter(client, through_txn)
            assert (value, tag) == (0, None)
            barrier.wait()  # every client read the absent counter before anyone writes
            won = try_increment(client, value, tag, counter)
            with counter.lock:
                counter.first_round_wins += won
            barrier.wait()
            successes = 0
            while successes < INCREMENTS:
                value, tag = read_counter(client, through_txn)
                successes += try_increment(client, value, tag, counter)
        except BaseException:
            barrier.abort()  # the other clients fail at once, not at the barrier's timeout
            raise
        finally:
            client.close()

    run_clients(CLIENTS, client_body)

    assert counter.first_round_wins == 1, "16 puts on one version: exactly one may win"
    total = 1 + CLIENTS * INCREMENTS
    assert len(counter.written) == total
    # Each winner read what the previous winner wrote: revisions ascend with the values.
    assert [value for _, value in sorted(counter.written)] == list(range(1, total + 1))
    client = TxnClient(server.port)
    answer = client.txn({"then": [{"get": "n"}]})
    final_revision = max(revision for revision, _ in counter.written)
    assert answer["results"] == [
        {
            "get": "n",
            "found": True,
            "value": str(total),
            "content_type": TEXT,
            "etag": etag(final_revision),
        }
    ]
    assert client.request("GET", "/kv/n")[::2] == (200, str(total).encode())
    client.close()
    assert counter.conflicts >= CLIENTS - 1  # the first round's losers, at least
    print(
        f"\n[txn-counter {backend}] {CLIENTS} clients, {total} increments,"
        f" {counter.conflicts} conflicts (succeeded=false) retried"
    )


# -- transfers between two balances -----------------------------------------------

TRANSFERS = 60  # attempts per client
START = 1000


class Bank:
    """What the transfer clients saw, across all threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # (revision, (a, b) read, ETag read, (a, b) written) of every transfer that won
        self.transfers: list[tuple[int, tuple[int, int], str, tuple[int, int]]] = []
        self.conflicts = 0
        self.consistent_reads = 0


def balances(results: list[dict[str, Any]], bank: Bank) -> tuple[tuple[int, int], str]:
    """Return (a, b) and their ETag from the results of [get a, get b]: one consistent read.

    Every write puts both keys, so in any one snapshot they share one ETag,
    and their sum is START * 2.
    """
    first, second = results
    assert first["get"] == "a" and second["get"] == "b", results
    assert first["found"] and second["found"], results
    a, b = int(first["value"]), int(second["value"])
    assert a + b == 2 * START, f"a consistent read shows a sum of {a + b}: {results}"
    assert first["etag"] == second["etag"], f"a and b from two different writes: {results}"
    with bank.lock:
        bank.consistent_reads += 1
    return (a, b), first["etag"]


@pytest.mark.backends("sqlite", "postgres")
def test_concurrent_transfers_keep_the_sum_and_are_serializable(server_factory, backend):
    """16 clients move random amounts between a and b, conditioned on both ETags.

    A client reads both keys in one transaction, then puts both if both
    ETags still hold; else its else branch reads both again (the state that
    beat it), and it retries from that.
    """
    server = start(server_factory)
    setup = TxnClient(server.port)
    first = setup.txn(
        {
            "if": [{"key": "a", "exists": False}, {"key": "b", "exists": False}],
            "then": [{"put": "a", "value": str(START)}, {"put": "b", "value": str(START)}],
        }
    )
    assert first["succeeded"] is True
    setup.close()
    bank = Bank()
    both = [{"get": "a"}, {"get": "b"}]

    def client_body(number: int) -> None:
        rng = random.Random(number)  # fixed per client
        client = TxnClient(server.port)
        try:
            read = client.txn({"then": both})
            assert read["succeeded"] is True
            (a, b), tag = balances(read["results"], bank)
            for _ in range(TRANSFERS):
                amount = rng.randint(-min(b, 100), min(a, 100))  # from a to b
                written = (a - amount, b + amount)
                answer = client.txn(
                    {
                        "if": [{"key": "a", "etag": tag}, {"key": "b", "etag": tag}],
                        "then": [
                            {"put": "a", "value": str(written[0])},
                            {"put": "b", "value": str(written[1])},
                        ],
                        "else": both,
                    }
                )
                if answer["succeeded"]:
                    revision = answer["revision"]
                    assert answer["results"] == [
                        {"put": "a", "etag": etag(revision), "created": False},
                        {"put": "b", "etag": etag(revision), "created": False},
                    ], answer
                    with bank.lock:
                        bank.transfers.append((revision, (a, b), tag, written))
                    read = client.txn({"then": both})
                    assert read["succeeded"] is True
                    (a, b), tag = balances(read["results"], bank)
                else:
                    with bank.lock:
                        bank.conflicts += 1
                    (a, b), tag = balances(answer["results"], bank)
        finally:
            client.close()

    run_clients(CLIENTS, client_body)

    # Serializable: sorted by revision, each transfer read exactly what the one
    # before it wrote, at its revision (the first read the setup's).
    previous_revision, previous = first["revision"], (START, START)
    for revision, read, tag, written in sorted(bank.transfers):
        assert (tag, read) == (etag(previous_revision), previous), (
            f"the transfer of revision {revision} read {read} at {tag}, but revision"
            f" {previous_revision} had written {previous}"
        )
        assert sum(written) == 2 * START
        previous_revision, previous = revision, written

    client = TxnClient(server.port)
    final, tag = balances(client.txn({"then": both})["results"], bank)
    assert (final, tag) == (previous, etag(previous_revision))
    client.close()
    assert bank.transfers, "no transfer succeeded"
    print(
        f"\n[txn-transfer {backend}] {CLIENTS} clients x {TRANSFERS} attempts:"
        f" {len(bank.transfers)} transfers, {bank.conflicts} conflicts,"
        f" {bank.consistent_reads} consistent reads all summing to {2 * START}"
    )


# -- the change stream ------------------------------------------------------------


def events(blocks: list[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """Parse SSE blocks into (id, event, data as JSON); comment blocks become ("", ":", {})."""
    parsed = []
    for block in blocks:
        if block.startswith(":"):
            parsed.append(("", ":", {}))
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        parsed.append((fields["id"], fields["event"], json.loads(fields["data"])))
    return parsed


def put_event(revision: int, n: int, key: str, value: dict[str, str], content_type: str):
    data = {"key": key, "revision": revision, **value}
    data.update(content_type=content_type, expires_at=None)
    return (f"{revision}-{n}", "put", data)


def delete_event(revision: int, n: int, key: str):
    return (f"{revision}-{n}", "delete", {"key": key, "revision": revision, "expired": False})


@pytest.mark.backends("sqlite", "postgres")
def test_one_transaction_is_one_revision_on_the_change_stream(server_factory, backend):
    """put, delete, put (and a get) in one txn: 3 events of one revision, R-0 to R-2, in order.

    A failed transaction before it makes no event and takes no revision;
    resuming after R-1 replays only R-2 and what came after.
    """
    server = start(server_factory)
    url = server.url
    client = TxnClient(server.port)
    status, _, _ = client.request("PUT", "/kv/w/gone", b"old", {"Content-Type": TEXT})
    assert status == 201
    r0 = revision_of(url)
    with Watch(f"{url}/kv/?watch&prefix=w/") as watch:
        assert events(watch.until(1)) == [(str(r0), "ready", {"revision": r0})]
        failed = client.txn(
            {
                "if": [{"key": "w/gone", "exists": False}],
                "then": [{"put": "w/never", "value": "x"}],
                "else": [{"get": "w/gone"}],
            }
        )
        assert failed["succeeded"] is False and failed["revision"] == r0
        answer = client.txn(
            {
                "if": [{"key": "w/gone", "etag": etag(r0)}, {"key": "w/b", "exists": False}],
                "then": [
                    {"put": "w/a", "value": "1 é"},
                    {"get": "w/gone"},
                    {"delete": "w/gone"},
                    {"put": "w/b", "value_base64": "AP8="},
                    {"put": "elsewhere", "value": "not under w/"},
                ],
            }
        )
        r = r0 + 1
        assert answer == {
            "succeeded": True,
            "revision": r,
            "results": [
                {"put": "w/a", "etag": etag(r), "created": True},
                {
                    "get": "w/gone",
                    "found": True,
                    "value": "old",
                    "content_type": TEXT,
                    "etag": etag(r0),
                },
                {"delete": "w/gone", "deleted": True},
                {"put": "w/b", "etag": etag(r), "created": True},
                {"put": "elsewhere", "etag": etag(r), "created": True},
            ],
        }
        status, _, _ = client.request("PUT", "/kv/w/after", b"2", {"Content-Type": TEXT})
        assert status == 201
        expected = [
            put_event(r, 0, "w/a", {"value": "1 é"}, TEXT),
            delete_event(r, 1, "w/gone"),
            put_event(r, 2, "w/b", {"value_base64": "AP8="}, OCTETS),
            # n = 3 is "elsewhere", outside the prefix.
            put_event(r + 1, 0, "w/after", {"value": "2"}, TEXT),
        ]
        assert events(watch.until(5))[1:] == expected
    with Watch(f"{url}/kv/?watch&prefix=w/", "-H", f"Last-Event-ID: {r}-1") as watch:
        assert events(watch.until(3)) == [("", ":", {}), *expected[2:]]
    with Watch(f"{url}/kv/?watch&since={r0}") as watch:  # no prefix: all four changes
        assert [event[0] for event in events(watch.until(6))] == [
            "",
            f"{r}-0",
            f"{r}-1",
            f"{r}-2",
            f"{r}-3",
            f"{r + 1}-0",
        ]
    client.close()


def test_curl_drives_a_compare_and_swap_of_two_keys(server, tmp_path):
    """The docs' session, with curl: -d @file posts the document; plain -d is a form (415)."""
    for key, value in (("alice", b"70"), ("bob", b"30")):
        status, headers, _ = curl("-X", "PUT", "--data-binary", value, f"{server.url}/kv/{key}")
        assert status == 201
    document = tmp_path / "move.json"
    document.write_text(
        json.dumps(
            {
                "if": [{"key": "alice", "etag": '"1"'}, {"key": "bob", "etag": '"2"'}],
                "then": [{"put": "alice", "value": "50"}, {"put": "bob", "value": "50"}],
                "else": [{"get": "alice"}, {"get": "bob"}],
            }
        )
    )
    post = ("-H", f"Content-Type: {JSON}", "--data-binary", f"@{document}", f"{server.url}/txn")
    status, headers, body = curl(*post)
    assert (status, headers["content-type"]) == (200, JSON)
    assert json.loads(body)["succeeded"] is True
    status, _, body = curl(*post)
    answer = json.loads(body)
    assert answer["succeeded"] is False
    assert [(r["value"], r["etag"]) for r in answer["results"]] == [("50", '"3"'), ("50", '"3"')]
    status, _, body = curl("-d", "{}", f"{server.url}/txn")
    assert status == 415
    assert (
        body
        == b"the body must be application/json (UTF-8), not 'application/x-www-form-urlencoded'\n"
    )
    status, headers, body = curl(
        "-H",
        "Accept: application/json",
        "-H",
        f"Content-Type: {JSON}",
        "-d",
        '{"then": [{"put": ""}]}',
        f"{server.url}/txn",
    )
    assert (status, headers["content-type"]) == (400, "application/problem+json")
    assert json.loads(body)["field"] == "then[0].put"
