"""Worker processes of `python -m kvapp serve`: one socket, one database, N processes."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import ROOT, KvappServer, child_pids, curl, server_environ
from workerkit import Client, one_client_per_worker, wait_for, workers_of

from kvapp import workers
from kvapp.config import ConfigError

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
def test_write_on_one_worker_is_read_back_through_every_other(server_factory, synchronous):
    server = server_factory(
        env={"KVAPP_SYNCHRONOUS": synchronous}, args=("--workers", "3"), kind=KvappServer
    )
    workers = workers_of(server, 3)
    with one_client_per_worker(server.port, workers) as clients:
        read_back_rounds(list(clients.values()))
    assert server.stop() == 0


def read_back_rounds(order: list[Client]) -> None:
    for round_ in range(150):
        writer = order[round_ % len(order)]
        value = f"v{round_}-{writer.worker}"
        # A new key and one hot key, overwritten every round: a reader stuck on
        # an old snapshot would return the previous round's value.
        status, body = writer.request(f"/set?k{round_}={value}&hot={value}")
        assert (status, body) == (200, b"stored 2 keys\n")
        for reader in order:
            assert reader.request(f"/get?key=k{round_}") == (200, value.encode()), reader.worker
            assert reader.request("/get?key=hot") == (200, value.encode()), reader.worker


def test_sigterm_to_the_parent_stops_every_worker(server_factory):
    server = server_factory(env={"KVAPP_WORKERS": "2"}, kind=KvappServer)
    workers = workers_of(server, 2)
    assert curl(f"{server.url}/set?a=1")[0] == 200
    assert server.stop() == 0
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists(), f"worker {pid} outlived its parent"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


def test_workers_stop_when_the_parent_is_killed(server_factory):
    server = server_factory(args=("--workers", "2"), kind=KvappServer)
    workers = workers_of(server, 2)
    server.proc.kill()
    server.proc.wait(timeout=10)

    def all_gone() -> bool:
        for pid in workers:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            if stat.rpartition(")")[2].split()[0] != "Z":
                return False
        return True

    wait_for(all_gone, what="workers to exit after their parent was killed")


def test_a_dead_worker_is_replaced(server_factory):
    server = server_factory(args=("--workers", "2"), kind=KvappServer)
    workers = workers_of(server, 2)
    os.kill(workers[0], signal.SIGKILL)
    wait_for(lambda: workers[0] not in child_pids(server.proc.pid), what="the worker to die")
    replaced = workers_of(server, 2)
    assert workers[0] not in replaced and workers[1] in replaced
    for i in range(20):  # fresh connections, whichever worker takes them
        assert curl(f"{server.url}/set?k{i}={i}")[0] == 200
        assert curl(f"{server.url}/get?key=k{i}")[:3:2] == (200, str(i).encode())
    assert server.stop() == 0


# The parent builds the app once (it succeeds), then every forked worker's
# make_app fails: the supervisor must give up instead of restarting forever.
FAILING_WORKERS = """
import sys
from kvapp import workers
calls = []
def make_app():
    calls.append(1)
    if len(calls) > 1:
        raise RuntimeError("worker cannot start")
    return lambda environ, start_response: []
sys.exit(workers.serve(make_app, {"host": "127.0.0.1", "port": 0}, workers=2))
"""


def test_supervisor_gives_up_when_workers_keep_dying():
    result = subprocess.run(
        [sys.executable, "-c", FAILING_WORKERS], cwd=ROOT, capture_output=True, timeout=60
    )
    assert result.returncode == 1
    stderr = result.stderr.decode()
    assert "RuntimeError: worker cannot start" in stderr
    assert "workers died within" in stderr


def test_a_port_in_use_is_one_line_and_status_1(server_factory):
    server = server_factory(args=("--workers", "2"), kind=KvappServer)
    result = subprocess.run(
        [sys.executable, "-m", "kvapp", "serve", "--port", str(server.port), "--workers", "2"],
        cwd=ROOT,
        env={**server.env, "KVAPP_DATABASE": str(Path(server.db_path).with_name("other.sqlite3"))},
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.decode().strip().splitlines() == [
        f"kvapp: cannot listen on 127.0.0.1:{server.port}: Address already in use;"
        " choose another port with --port or KVAPP_PORT"
    ]


def test_a_host_that_names_no_address_is_one_line_naming_the_setting(tmp_path):
    # getaddrinfo's errors have negative numbers, which os.strerror knows
    # nothing of: the line said "Unknown error -2".
    result = subprocess.run(
        [sys.executable, "-m", "kvapp", "serve", "--port", "0"],
        cwd=ROOT,
        env={**server_environ(), "KVAPP_DATABASE": str(tmp_path / "kv.sqlite3"), "KVAPP_HOST": ""},
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 1
    (line,) = result.stderr.decode().strip().splitlines()
    assert line.startswith("kvapp: cannot listen on :0: ")
    assert line.endswith("; check the host setting (--host or KVAPP_HOST)")
    assert "Unknown error" not in line


def test_an_ipv6_host_is_written_in_brackets_in_urls():
    assert [workers._url_host(h) for h in ("::1", "[::1]", "127.0.0.1", "localhost")] == [
        "[::1]",
        "[::1]",
        "127.0.0.1",
        "localhost",
    ]


def test_workers_setting_is_checked(make_settings):
    from kvapp.config import load_config

    assert make_settings().workers == 1
    config = ROOT / "config.ini"
    assert load_config(config, environ={"KVAPP_WORKERS": "4"}).workers == 4
    for bad in ("0", "65", "two"):
        with pytest.raises(ConfigError, match="workers"):
            load_config(config, environ={"KVAPP_WORKERS": bad})
    result = subprocess.run(
        [sys.executable, "-m", "kvapp", "serve", "--workers", "0"],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert b"bad value for workers (--workers): must be between 1 and 64" in result.stderr


def test_cas_race_across_workers_has_exactly_one_winner(server_factory):
    server = server_factory(args=("--workers", "3"), kind=KvappServer)
    with one_client_per_worker(server.port, workers_of(server, 3)) as readers:
        cas_rounds(server, readers)
    assert server.stop() == 0


def cas_rounds(server: KvappServer, readers: dict[int, Client]) -> None:
    racers = 24
    for round_ in range(5):
        path = f"/kv/race-{round_}"
        status, headers, _ = put(server.port, path, b"start")
        assert status == 201
        etag = headers["etag"]
        barrier = threading.Barrier(racers)
        results: list[tuple[int, int, str | None]] = []

        def race(index, path=path, etag=etag, barrier=barrier, results=results) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            try:
                conn.connect()  # fresh connections: the kernel spreads them over the workers
                barrier.wait(timeout=30)
                conn.request("PUT", path, body=f"w{index}".encode(), headers={"If-Match": etag})
                response = conn.getresponse()
                response.read()
                results.append((index, response.status, response.getheader("ETag")))
            finally:
                conn.close()

        threads = [threading.Thread(target=race, args=(i,)) for i in range(racers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert sorted(status for _, status, _ in results) == [204] + [412] * (racers - 1)
        winner, _, winner_tag = next(result for result in results if result[1] == 204)
        for reader in readers.values():
            reader.conn.request("GET", path)
            response = reader.conn.getresponse()
            assert (response.status, response.read()) == (200, f"w{winner}".encode())
            assert response.getheader("ETag") == winner_tag


def put(port: int, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("PUT", path, body=body)
        response = conn.getresponse()
        headers = {name.lower(): value for name, value in response.getheaders()}
        return response.status, headers, response.read()
    finally:
        conn.close()


def get_requests_total(text: str) -> float:
    pattern = r'^kvapp_requests_total\{route="/get",method="GET",code="200"\} (\S+)$'
    match = re.search(pattern, text, re.M)
    return float(match[1]) if match else 0.0


def test_metrics_count_the_traffic_of_every_worker(server_factory):
    server = server_factory(args=("--workers", "3"), kind=KvappServer)
    assert curl(f"{server.url}/set?m=1")[0] == 200
    with one_client_per_worker(server.port, workers_of(server, 3)) as clients:
        seen, expected = scrape_after_traffic(clients)
    assert len(seen) == 3 and seen == dict.fromkeys(seen, float(expected))
    assert server.stop() == 0


def scrape_after_traffic(clients: dict[int, Client]) -> tuple[dict[int, float], int]:
    """Send 10, 15 and 20 GETs through the workers; return each one's scraped total."""
    per_worker = {pid: 10 + 5 * i for i, pid in enumerate(sorted(clients))}  # 10, 15, 20
    for pid, count in per_worker.items():
        for _ in range(count):
            assert clients[pid].request("/get?key=m") == (200, b"1")
    # Each worker adds its counts to the shared file once a second; a scrape on
    # any worker sums them.  Scrape through every worker until all have flushed.
    expected = sum(per_worker.values())
    deadline = time.monotonic() + 15
    seen: dict[int, float] = {}
    while time.monotonic() < deadline:
        for pid, client in clients.items():
            status, body = client.request("/metrics")
            assert status == 200
            seen[pid] = get_requests_total(body.decode())
        if all(total == expected for total in seen.values()):
            break
        time.sleep(0.2)
    return seen, expected
