"""The /kv/ API through real waitress processes: CAS races, TTL expiry, raw URIs, metrics.

Every test runs on both backends; with PostgreSQL the racing servers share one database.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time

import pytest
from helpers import curl, stored

pytestmark = [pytest.mark.slow, pytest.mark.backends("sqlite", "postgres")]


def request(server, method, path, body=None, headers=None):
    """Send one request on a new connection; return (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        headers = {name.lower(): value for name, value in response.getheaders()}
        return response.status, headers, response.read()
    finally:
        conn.close()


def race(servers, count, make_request):
    """Run count requests at once, spread over servers; return [(index, status, headers)]."""
    barrier = threading.Barrier(count)
    results = []
    lock = threading.Lock()

    def run(index):
        server = servers[index % len(servers)]
        method, path, body, headers = make_request(index)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            conn.connect()
            barrier.wait(timeout=30)
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            with lock:
                headers = {name.lower(): value for name, value in response.getheaders()}
                results.append((index, response.status, headers))
        finally:
            conn.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == count
    return results


WRITERS = 24
ROUNDS = 5


@pytest.fixture
def two_servers(server_factory):
    """Two waitress processes on one database: writers race across processes too."""
    return [server_factory(), server_factory()]


def test_cas_put_race_has_exactly_one_winner(two_servers):
    for round_number in range(ROUNDS):
        path = f"/kv/race-{round_number}"
        status, headers, _ = request(two_servers[0], "PUT", path, b"start")
        assert status == 201
        etag = headers["etag"]
        results = race(
            two_servers,
            WRITERS,
            lambda i, path=path, etag=etag: ("PUT", path, f"w{i}".encode(), {"If-Match": etag}),
        )
        statuses = sorted(status for _, status, _ in results)
        assert statuses == [204] + [412] * (WRITERS - 1), statuses
        winner = next(index for index, status, _ in results if status == 204)
        winner_tag = next(h["etag"] for _, status, h in results if status == 204)
        status, headers, body = request(two_servers[1], "GET", path)
        assert (status, body, headers["etag"]) == (200, f"w{winner}".encode(), winner_tag)


def test_create_only_race_has_exactly_one_winner(two_servers):
    for round_number in range(ROUNDS):
        path = f"/kv/create-{round_number}"
        results = race(
            two_servers,
            WRITERS,
            lambda i, path=path: ("PUT", path, f"{i}".encode(), {"If-None-Match": "*"}),
        )
        statuses = sorted(status for _, status, _ in results)
        assert statuses == [201] + [412] * (WRITERS - 1), statuses
        winner = next(index for index, status, _ in results if status == 201)
        assert request(two_servers[0], "GET", path)[2] == f"{winner}".encode()


def test_conditional_delete_race_has_exactly_one_winner(two_servers):
    for round_number in range(ROUNDS):
        path = f"/kv/delete-{round_number}"
        etag = request(two_servers[0], "PUT", path, b"v")[1]["etag"]
        results = race(
            two_servers,
            WRITERS,
            lambda i, path=path, etag=etag: ("DELETE", path, None, {"If-Match": etag}),
        )
        statuses = [status for _, status, _ in results]
        assert statuses.count(204) == 1, statuses
        # A loser finds the key gone (404), as an unconditional DELETE would.
        assert set(statuses) <= {204, 404}, statuses
        assert request(two_servers[1], "GET", path)[0] == 404


def test_ttl_expires_through_the_server_and_the_sweeper_removes_the_row(server_factory, database):
    server = server_factory(env={"KVAPP_SWEEP_INTERVAL_SECONDS": "1"})
    stored_at = time.time()
    status, headers, _ = request(server, "PUT", "/kv/short?ttl=2", b"soon gone")
    assert status == 201
    request(server, "PUT", "/kv/long", b"stays")
    status, _, body = request(server, "GET", "/kv/short")
    if time.time() - stored_at < 1.5:  # on a very slow machine the key may already be gone
        assert (status, body) == (200, b"soon gone")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and request(server, "GET", "/kv/short")[0] == 200:
        time.sleep(0.1)
    assert time.time() - stored_at >= 2
    assert request(server, "GET", "/kv/short")[0] == 404
    assert request(server, "GET", "/get?key=short")[0] == 404
    assert request(server, "GET", "/kv/")[2] == b"long\n"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        keys = [row[0] for row in stored(database, "SELECT key FROM kv")]
        if keys == ["long"]:
            break
        time.sleep(0.1)
    assert keys == ["long"]


def raw(server, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def test_raw_uri_is_decoded_strictly(server):
    # waitress would hand the app PATH_INFO '/kv/%zz' for this; the key comes from REQUEST_URI.
    answer = raw(server, b"GET /kv/%zz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"malformed percent-escape" in answer
    answer = raw(server, b"GET /kv/%ff HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ") and b"not valid UTF-8" in answer


def test_keys_with_slashes_plus_and_utf8_through_curl(server):
    status, headers, _ = curl("-T", "-", f"{server.url}/kv/dir/caf%C3%A9+1", data=b"\x00\xff")
    assert status == 201
    assert headers["location"] == "/kv/dir/caf%C3%A9%2B1"
    status, headers, body = curl(f"{server.url}/kv/dir%2Fcaf%C3%A9%2B1")
    assert (status, body, headers["content-type"]) == (200, b"\x00\xff", "application/octet-stream")
    status, _, body = curl(f"{server.url}/kv/?prefix=dir/")
    assert (status, body) == (200, "dir/café+1\n".encode())


def test_chunked_put_and_head(server):
    status, _, _ = curl(
        "-X", "PUT", "-H", "Transfer-Encoding: chunked", "-H", "Content-Type: text/csv",
        "--data-binary", "@-", f"{server.url}/kv/chunked", data=b"a,b\n1,2\n",
    )  # fmt: skip
    assert status == 201
    status, headers, body = curl("-I", f"{server.url}/kv/chunked")
    assert (status, body) == (200, b"")
    assert headers["content-length"] == "8"
    assert headers["content-type"] == "text/csv"
    assert headers["cache-control"] == "no-cache"


def test_put_over_the_value_limit_is_413_through_waitress(server_factory):
    server = server_factory(env={"KVAPP_MAX_VALUE_BYTES": "100"})
    status, _, body = curl(
        "-X", "PUT", "--data-binary", "@-", f"{server.url}/kv/big", data=b"x" * 101
    )
    assert status == 413 and b"limit is 100" in body
    assert curl(f"{server.url}/kv/big")[0] == 404


SAMPLE = re.compile(
    r'^kvapp_requests_total\{route="([^"]*)",method="([A-Za-z]+)",code="(\d+)"\} (\S+)$'
)


def requests_by_label(text: str) -> dict[tuple[str, str, int], float]:
    counts = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match:
            counts[match[1], match[2], int(match[3])] = float(match[4])
    return counts


def test_metrics_scraped_before_and_after_traffic(server):
    status, headers, body = curl(f"{server.url}/metrics")
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    before = requests_by_label(body.decode())
    for i in range(5):
        assert request(server, "PUT", f"/kv/m{i}", b"v")[0] == 201
    for _ in range(3):
        assert request(server, "GET", "/kv/m0")[0] == 200
    assert request(server, "GET", "/kv/absent")[0] == 404
    assert request(server, "DELETE", "/kv/m4")[0] == 204
    assert request(server, "GET", "/set?x=1&y=2")[0] == 200
    assert request(server, "POST", "/kv/m0")[0] == 405
    status, _, body = curl(f"{server.url}/metrics")
    text = body.decode()
    after = requests_by_label(text)

    def delta(route, method, code):
        return after.get((route, method, code), 0) - before.get((route, method, code), 0)

    assert delta("/kv/{key}", "PUT", 201) == 5
    assert delta("/kv/{key}", "GET", 200) == 3
    assert delta("/kv/{key}", "GET", 404) == 1
    assert delta("/kv/{key}", "DELETE", 204) == 1
    assert delta("/set", "GET", 200) == 1
    assert delta("/kv/{key}", "POST", 405) == 1
    assert delta("/metrics", "GET", 200) == 1
    assert re.search(r"^kvapp_keys 6$", text, re.M)  # m0..m3, x, y
    assert re.search(r"^kvapp_commits_total 7$", text, re.M)
    assert re.search(r'^kvapp_commit_batch_size_bucket\{le="1"\} 7$', text, re.M)
    assert re.search(r"^kvapp_database_bytes [1-9][0-9]*$", text, re.M)
    assert re.search(
        r'^kvapp_request_duration_seconds_count\{route="/kv/\{key\}"\} 11$', text, re.M
    )
