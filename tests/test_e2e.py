"""End to end: real `waitress-serve wsgi:app` subprocesses, driven by curl and raw sockets.

Every test that serves runs on both backends: an SQLite file and PostgreSQL.
"""

from __future__ import annotations

import http.client
import os
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import ROOT, curl, stored
from tools import serving

from kvapp.web.seed_routes import USAGE

pytestmark = [pytest.mark.slow, pytest.mark.backends("sqlite", "postgres")]

TEXT = "text/plain; charset=utf-8"


def check_headers(headers: dict[str, str], body: bytes | None) -> None:
    assert headers["content-type"] == TEXT
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["cache-control"] == "no-store"
    if body is not None:
        assert headers["content-length"] == str(len(body))


def one_line(body: bytes) -> str:
    assert body.endswith(b"\n") and body.count(b"\n") == 1, body
    return body.decode("utf-8")


def rows_on_disk(database: str | Path) -> list[tuple[str, bytes]]:
    """Return every (key, value) in the database, read through a connection of our own."""
    return stored(database, "SELECT key, value FROM kv ORDER BY key")


# -- the contract through waitress ----------------------------------------------------


def test_index_names_the_port_the_server_listens_on(tmp_path):
    """python -m kvapp serve on a port the kernel picks: the usage text names that port."""
    with serving("--database", str(tmp_path / "kv.sqlite3")) as (_, port):
        for host in ("127.0.0.1", "localhost"):
            # --connect-to: localhost is 127.0.0.1 whatever /etc/hosts says first.
            to = ("--connect-to", f"localhost:{port}:127.0.0.1:{port}")
            status, _, body = curl(*to, f"http://{host}:{port}/")
            assert status == 200
            usage = body.decode()
            assert f"  curl '{host}:{port}/get?key=somekey'" in usage
            assert f"The whole API: {host}:{port}/openapi.json\n" in usage
            assert usage == USAGE.format(server=f"{host}:{port}")  # every example names it


def test_set_get_head_and_index(server):
    status, headers, body = curl(f"{server.url}/set?greeting=hello+world&n=%E2%82%AC1")
    assert (status, body) == (200, b"stored 2 keys\n")
    check_headers(headers, body)

    status, headers, body = curl(f"{server.url}/get?key=greeting")
    assert (status, body) == (200, b"hello world")
    check_headers(headers, body)
    status, headers, body = curl(f"{server.url}/get?key=n")
    assert (status, body) == (200, "€1".encode())
    assert headers["content-length"] == "4"

    status, head_headers, body = curl("-I", f"{server.url}/get?key=n")
    assert (status, body) == (200, b"")
    assert head_headers["content-length"] == "4"
    check_headers(head_headers, None)

    status, headers, body = curl(f"{server.url}/")
    assert status == 200 and b"/get?key=" in body
    check_headers(headers, body)


def test_main_errors_through_waitress(server_factory):
    server = server_factory(env={"KVAPP_MAX_BODY_BYTES": "1000"})
    url = server.url
    cases = [
        (["-g", f"{url}/get?key=missing"], 404, "missing"),
        ([f"{url}/get"], 400, "key"),
        ([f"{url}/get?key=a&key=b"], 400, "once"),
        ([f"{url}/set"], 400, "nothing to store"),
        ([f"{url}/set?a=1&a=2"], 400, "more than once"),
        ([f"{url}/set?a=1&b=%ff"], 400, "UTF-8"),
        ([f"{url}/set?a=1&b=%zz"], 400, "percent-escape"),
        ([f"{url}/set?a=1&%00=1"], 400, "control"),
        ([f"{url}/set?a=1&{'k' * 1025}=1"], 400, "1025 bytes"),
        ([f"{url}/nope"], 404, ""),
        ([f"{url}/set/?a=1"], 404, ""),
        ([f"{url}/GET?key=a"], 404, ""),
        (["-X", "PUT", f"{url}/set?a=1"], 405, ""),
        (["-X", "DELETE", f"{url}/get?key=a"], 405, ""),
        (["-H", "Content-Type: application/json", "-d", '{"a": 1}', f"{url}/set?a=1"], 415, ""),
        (["--data-binary", "@-", f"{url}/set?a=1"], 413, "1000"),
    ]
    for args, expected, words in cases:
        status, headers, body = curl(*args, data=b"a=" + b"x" * 1000)
        assert status == expected, (args, status, body)
        check_headers(headers, body)
        assert words in one_line(body)
        if expected == 405:
            assert headers["allow"] in ("GET, POST", "GET, HEAD")
    assert rows_on_disk(server.db_path) == []  # nothing of any refused request


def test_post_large_value_with_curl_data_urlencode(server, tmp_path: Path):
    value = ("line one\nsecond & last = ok +/% é\n" * 20_000).encode()  # ~0.7 MiB
    source = tmp_path / "big.txt"
    source.write_bytes(value)
    status, _, body = curl("--data-urlencode", f"big@{source}", f"{server.url}/set?small=1")
    assert (status, body) == (200, b"stored 2 keys\n")
    status, headers, body = curl(f"{server.url}/get?key=big")
    assert (status, body) == (200, value)
    assert headers["content-length"] == str(len(value))


def test_chunked_post_body(server):
    status, _, body = curl(
        "-H", "Transfer-Encoding: chunked", "--data-binary", "@-", f"{server.url}/set",
        data=b"a=1&b=two",
    )  # fmt: skip
    assert (status, body) == (200, b"stored 2 keys\n")
    assert curl(f"{server.url}/get?key=b")[2] == b"two"


def send_raw(port: int, target: bytes) -> bytes:
    """Send one GET with target as raw bytes; return the whole answer."""
    request = b"GET " + target + f" HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request + b"Connection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_raw_utf8_in_the_request_line_is_never_stored_wrong(server):
    """waitress 3.0.2 answers raw non-ASCII bytes in the URI with 400 before the app
    sees them; whatever the server does, a stored key and value are the UTF-8 sent."""
    answer = send_raw(server.port, "/set?clé=été".encode())
    status = int(answer.split(b" ", 2)[1])
    assert status in (200, 400), answer
    assert rows_on_disk(server.db_path) == ([("clé", "été".encode())] if status == 200 else [])
    # The same request %-encoded is served: the refusal was about the raw bytes.
    assert send_raw(server.port, b"/set?cl%C3%A9=%C3%A9t%C3%A9").startswith(b"HTTP/1.1 200 ")
    assert rows_on_disk(server.db_path) == [("clé", "été".encode())]


# -- restarts and crashes -------------------------------------------------------------


def test_data_survives_sigterm_and_restart(server_factory):
    first = server_factory()
    assert curl(f"{first.url}/set?a=1&b=%0A")[0] == 200
    assert curl(f"{first.url}/set?a=2")[0] == 200
    first.stop()
    second = server_factory()
    assert curl(f"{second.url}/get?key=a")[2] == b"2"
    assert curl(f"{second.url}/get?key=b")[2] == b"\n"


def test_acknowledged_set_survives_kill_9(server_factory, database: str):
    first = server_factory()
    status, _, body = curl(f"{first.url}/set?durable=yes&also=%C3%A9")
    assert (status, body) == (200, b"stored 2 keys\n")
    first.kill()  # SIGKILL at once: nothing gets to flush or close
    assert first.proc.returncode == -9
    # The pair is in the file (and its WAL) for any SQLite reader, or committed in PostgreSQL.
    assert rows_on_disk(database) == [("also", "é".encode()), ("durable", b"yes")]
    second = server_factory()
    assert curl(f"{second.url}/get?key=durable")[2] == b"yes"
    assert curl(f"{second.url}/get?key=also")[2] == "é".encode()


def test_pair_is_on_disk_while_the_server_runs(server, database: str):
    assert curl(f"{server.url}/set?k=v%00w")[0] == 200
    assert rows_on_disk(database) == [("k", b"v\x00w")]


# -- concurrency ---------------------------------------------------------------------

THREADS = 16
REQUESTS = 8


def test_concurrent_writers_through_the_real_server(server, database: str):
    barrier = threading.Barrier(THREADS, timeout=60)
    failures: list[str] = []

    def writer(thread: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        try:
            barrier.wait()
            for request in range(REQUESTS):
                # two keys per request: the pair must land in one write
                path = f"/set?t{thread}-r{request}=v{thread}.{request}&t{thread}-r{request}-b=x"
                conn.request("GET", path)
                response = conn.getresponse()
                body = response.read()
                if (response.status, body) != (200, b"stored 2 keys\n"):
                    failures.append(f"{path}: {response.status} {body!r}")
        except Exception as exc:  # reported below, in the test's thread
            failures.append(f"thread {thread}: {exc!r}")
        finally:
            conn.close()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        for thread in range(THREADS):
            for request in range(REQUESTS):
                conn.request("GET", f"/get?key=t{thread}-r{request}")
                response = conn.getresponse()
                assert (response.status, response.read()) == (200, f"v{thread}.{request}".encode())
    finally:
        conn.close()

    rows = stored(database, "SELECT key, revision FROM kv")
    assert len(rows) == 2 * THREADS * REQUESTS
    revisions: dict[int, set[str]] = {}
    for key, revision in rows:
        revisions.setdefault(revision, set()).add(key.removesuffix("-b"))
    # one revision per request, and each request's two keys share it
    assert len(revisions) == THREADS * REQUESTS
    assert all(len(keys) == 1 for keys in revisions.values())


# -- keep-alive ------------------------------------------------------------------------


def read_response(stream, head: bool = False) -> tuple[int, dict[str, str], bytes]:
    status_line = stream.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers["content-length"])
    body = b"" if head else stream.read(length)
    assert len(body) == (0 if head else length)
    return int(status_line.split()[1]), headers, body


def test_many_requests_on_one_connection(server):
    script = []
    for n in range(40):
        script += [
            (f"GET /set?k{n}=v{n} HTTP/1.1", 200, b"stored 1 key\n"),
            (f"GET /get?key=k{n} HTTP/1.1", 200, f"v{n}".encode()),
            (f"HEAD /get?key=k{n} HTTP/1.1", 200, b""),
        ]
    script += [
        ("GET /get?key=absent HTTP/1.1", 404, None),
        ("GET /get HTTP/1.1", 400, None),
        ("PUT /set?a=1 HTTP/1.1", 405, None),
        ("GET /nope HTTP/1.1", 404, None),
        ("GET /get?key=k0 HTTP/1.1", 200, b"v0"),
    ]
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock,
        sock.makefile("rb") as stream,
    ):
        for line, status, body in script:
            sock.sendall(f"{line}\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode())
            got_status, headers, got_body = read_response(stream, head=line.startswith("HEAD"))
            assert got_status == status, (line, got_status, got_body)
            assert headers.get("connection", "").lower() != "close"
            if body is not None:
                assert got_body == body, line
            check_headers(headers, None)


def test_pipelined_requests_on_one_connection(server):
    lines = [f"GET /set?p{n}={n} HTTP/1.1" for n in range(20)]
    lines += [f"GET /get?key=p{n} HTTP/1.1" for n in range(20)]
    host = f"127.0.0.1:{server.port}"
    payload = "".join(f"{line}\r\nHost: {host}\r\n\r\n" for line in lines).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(payload)
        with sock.makefile("rb") as stream:
            answers = [read_response(stream) for _ in lines]
    assert [status for status, _, _ in answers] == [200] * 40
    assert [body for _, _, body in answers[20:]] == [str(n).encode() for n in range(20)]


def test_curl_reuses_one_connection_for_several_urls(server):
    urls = [f"{server.url}/set?c{n}={n}" for n in range(5)]
    urls += [f"{server.url}/get?key=c{n}" for n in range(5)]
    result = subprocess.run(
        ["curl", "-sS", "-v", "--max-time", "30", *urls], capture_output=True, check=True
    )
    assert result.stdout == b"stored 1 key\n" * 5 + b"01234"
    assert result.stderr.count(b"Connected to") == 1
    assert result.stderr.lower().count(b"re-using existing connection") >= 9


# -- a database that is not fit to serve ---------------------------------------------------


def make_garbage(path: Path) -> None:
    path.write_bytes(b"this is not a database\n" * 500)


def make_foreign(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE contacts (name TEXT)")
    conn.commit()
    conn.close()


def make_damaged(path: Path) -> None:
    """A kvapp database whose key index page is zeroed: only PRAGMA quick_check sees it."""
    from kvapp.store.sqlite import SQLiteStore

    repository = SQLiteStore(str(path))
    repository.set_many([(f"k{i}", b"v" * 100, TEXT) for i in range(200)])
    repository.close()
    conn = sqlite3.connect(path)
    root = conn.execute(
        "SELECT rootpage FROM sqlite_master WHERE name = 'sqlite_autoindex_kv_1'"
    ).fetchone()[0]
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    with open(path, "r+b") as handle:
        handle.seek((root - 1) * page_size)
        handle.write(bytes(page_size))


UNFIT = [make_garbage, make_foreign, make_damaged]
COMMANDS = {
    "waitress-serve": [
        str(Path(sys.executable).with_name("waitress-serve")),
        "--port=0",
        "wsgi:app",
    ],
    "python -m kvapp serve": [sys.executable, "-m", "kvapp", "serve", "--port=0"],
}


@pytest.mark.parametrize("command", COMMANDS.values(), ids=COMMANDS.keys())
@pytest.mark.parametrize("make", UNFIT, ids=[m.__name__ for m in UNFIT])
def test_unfit_database_stops_startup_with_one_line(command, make, db_path: Path):
    db_path.parent.mkdir(parents=True)
    make(db_path)
    before = db_path.read_bytes()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVAPP_")}
    env["KVAPP_DATABASE"] = str(db_path)
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1, result.stderr
    assert str(db_path) in result.stderr
    assert "Traceback" not in result.stderr
    assert db_path.read_bytes() == before
