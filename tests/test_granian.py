"""The same wsgi:app served by granian, the optional fast server (bench/requirements.txt)."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest
from helpers import GranianServer, child_pids, curl

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path(sys.executable).with_name("granian").exists(),
        reason="granian is not installed (pip install -r bench/requirements.txt)",
    ),
]


def raw_request(port: int, request: bytes) -> bytes:
    """Send raw bytes; return the status line."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n", 1)[0]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_set_and_get_through_granian(server_factory, workers):
    server = server_factory(args=("--workers", workers), kind=GranianServer)
    assert curl(f"{server.url}/set?a=1&%C3%A9t%C3%A9=%E2%82%AC+x")[::2] == (200, b"stored 2 keys\n")
    deadline = time.monotonic() + 10
    while len(child_pids(server.proc.pid)) < int(workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(child_pids(server.proc.pid)) >= int(workers), server.output()
    for _ in range(10):  # fresh connections: with 2 workers both get some
        assert curl(f"{server.url}/get?key=a")[::2] == (200, b"1")
        status, headers, body = curl(f"{server.url}/get?key=%C3%A9t%C3%A9")
        assert (status, body) == (200, "€ x".encode())
        assert headers["content-type"] == "text/plain; charset=utf-8"
        assert headers["x-content-type-options"] == "nosniff"
    # A form body: granian must pass CONTENT_TYPE, CONTENT_LENGTH and the body.
    status, _, body = curl(f"{server.url}/set", "--data-urlencode", "big=" + "x" * 100_000)
    assert (status, body) == (200, b"stored 1 key\n")
    assert curl(f"{server.url}/get?key=big")[::2] == (200, b"x" * 100_000)
    assert curl(f"{server.url}/get?key=missing")[0] == 404
    assert curl(f"{server.url}/get?key=%FF")[0] == 400  # strict decoding is the app's
    assert curl("-X", "DELETE", f"{server.url}/get?key=a")[0] == 405
    # Like waitress, granian refuses a request target that is not UTF-8.  (Unlike
    # waitress, it passes raw UTF-8 bytes on, as PEP 3333 latin-1 strings.)
    line = raw_request(server.port, b"GET /get?key=\xff HTTP/1.1\r\nHost: x\r\n\r\n")
    assert line == b"HTTP/1.1 400 Bad Request"
    assert server.stop() == 0
