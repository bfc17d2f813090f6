"""The guard and the access log through real servers, driven by curl and raw sockets."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, curl, free_port, server_environ

pytestmark = pytest.mark.slow

TOKEN = "Zq3-v9_kT2.xW~p+7/Lm"
SECRET = "hunter2-S3CRET"


def raw(port: int, request: bytes) -> bytes:
    """Send request bytes on a new connection; return the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_waitress_refuses_a_foreign_host_and_a_cross_site_post(server):
    url = server.url
    status, _, body = curl("-H", "Host: evil.example", f"{url}/set?k=v")
    assert (status, body) == (
        400,
        b"the host 'evil.example' is not served here; see allowed_hosts\n",
    )

    cross_site = ("-H", "Origin: https://evil.example", "-H", "Sec-Fetch-Site: cross-site")
    status, headers, body = curl(*cross_site, "--data-urlencode", "k=v", f"{url}/set")
    assert status == 403
    assert headers["content-type"] == "text/plain; charset=utf-8"

    status, _, _ = curl("-H", "Sec-Fetch-Site: cross-site", f"{url}/set?k=v")  # an <img src>
    assert status == 403
    assert curl(f"{url}/get?key=k")[0] == 404  # nothing was stored

    # The same browser request from our own origin is served.
    same = ("-H", f"Origin: {url}", "-H", "Sec-Fetch-Site: same-origin")
    assert curl(*same, "--data-urlencode", "k=v", f"{url}/set")[0] == 200
    assert curl("-H", f"Host: [::1]:{server.port}", f"{url}/get?key=k")[2] == b"v"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /set?k=v HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n\r\n",
        b"GET http://evil.example/set?k=v HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"GET /set?k=v HTTP/1.0\r\n\r\n",
        b"GET /set?k=v HTTP/1.1\r\nHost: localhost:4000:1\r\n\r\n",
    ],
    ids=["two-hosts", "absolute-form", "no-host", "malformed"],
)
def test_raw_requests_with_a_bad_host_are_400(server, request_bytes):
    answer = raw(server.port, request_bytes)
    assert re.match(rb"HTTP/1\.[01] 400 ", answer), answer[:200]
    assert curl(f"{server.url}/get?key=k")[0] == 404


@pytest.mark.parametrize(
    "target",
    [b"/kv/frag#ment", b"/set?fr1=1#fr2=2", b"/kv/ta\tb", b"/set?t\te=1", b"/set?a=\x01"],
)
@pytest.mark.parametrize("method", [b"GET", b"PUT"])
def test_a_raw_fragment_or_control_byte_in_the_target_is_400_and_stores_nothing(
    server, method, target
):
    # waitress's urlsplit would drop the '#...' and the tab: the key 'frag',
    # the pair fr2 lost, the key 'te'.
    answer = raw(
        server.port,
        method + b" " + target + b" HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1\r\n"
        b"Connection: close\r\n\r\nv",
    )
    assert re.match(rb"HTTP/1\.1 400 ", answer), answer[:300]
    assert curl(f"{server.url}/kv/")[2] == b""


def test_token_from_the_environment_is_enforced(server_factory):
    server = server_factory(env={"KVAPP_AUTH_TOKEN": TOKEN})
    url = f"{server.url}/set?k=v"

    status, headers, _ = curl(url)
    assert status == 401
    assert headers["www-authenticate"] == 'Bearer realm="kvapp"'

    status, headers, _ = curl("-H", "Authorization: Bearer wrong-token-0123456789", url)
    assert status == 401
    assert headers["www-authenticate"] == 'Bearer realm="kvapp", error="invalid_token"'

    status, _, body = curl("-H", f"Authorization: Bearer {TOKEN}", url)
    assert (status, body) == (200, b"stored 1 key\n")
    status, _, body = curl("--oauth2-bearer", TOKEN, f"{server.url}/get?key=k")
    assert (status, body) == (200, b"v")

    status, headers, _ = curl(f"{server.url}/healthz")
    assert status != 401 and "www-authenticate" not in headers
    assert TOKEN not in server.output()


def test_waitress_serve_writes_one_redacted_access_line_per_request(server):
    bodies = [
        curl(f"{server.url}/set?password={SECRET}&user=x")[2],
        curl("--data-urlencode", f"password={SECRET}", f"{server.url}/set")[2],
        curl(f"{server.url}/get?key=password")[2],
        curl("-H", "Host: evil.example", f"{server.url}/")[2],
    ]
    # Under load access lines are written in bulk, within 50 ms: wait for them.
    deadline = time.monotonic() + 10
    while True:
        lines = [line for line in server.output().splitlines() if " kvapp.access: " in line]
        if len(lines) >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert len(lines) == 4, server.output()
    fields = [re.search(r'"(\S+ \S+)" (\d+) (\d+) \d+\.\dms$', line).groups() for line in lines]
    assert fields == [
        ("GET /set?password=***&user=***", "200", str(len(bodies[0]))),
        ("POST /set", "200", str(len(bodies[1]))),
        ("GET /get?key=***", "200", str(len(SECRET))),
        ("GET /", "400", str(len(bodies[3]))),
    ]
    assert all(line.split(" kvapp.access: ")[1].startswith("127.0.0.1 ") for line in lines)
    assert SECRET not in server.output()


def test_a_request_waitress_refuses_has_its_redacted_access_line(server):
    # A body over waitress's limit is refused from the headers alone, before
    # kvapp sees it (kvapp.refusals); the line redacts the query as any other.
    request = (
        f"POST /set?password={SECRET} HTTP/1.1\r\nHost: localhost\r\n"
        "Content-Length: 99999999999\r\n\r\n"  # over waitress-serve's 1 GiB too
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request.encode())  # the body never comes: the answer is the 413 alone
        answer = b""
        while not re.search(rb"\r\nContent-Length: (\d+)\r\n.*\r\n\r\n", answer, re.S) or len(
            answer.partition(b"\r\n\r\n")[2]
        ) < int(re.search(rb"\r\nContent-Length: (\d+)\r\n", answer).group(1)):
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
    assert re.match(rb"HTTP/1\.1 413 ", answer), answer[:200]
    body = answer.partition(b"\r\n\r\n")[2]
    deadline = time.monotonic() + 10
    while " 413 " not in server.output() and time.monotonic() < deadline:
        time.sleep(0.02)
    lines = [line for line in server.output().splitlines() if " kvapp.access: " in line]
    assert len(lines) == 1, server.output()
    assert (
        lines[0]
        .split(" kvapp.access: ")[1]
        .startswith(f'127.0.0.1 "POST /set?password=***" 413 {len(body)} ')
    ), lines
    assert SECRET not in server.output()


def listening_addresses(port: int) -> list[str]:
    """Return the local addresses of LISTEN sockets on port, from /proc/net/tcp{,6}."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            next(handle)
            for line in handle:
                fields = line.split()
                address, _, hex_port = fields[1].rpartition(":")
                if int(hex_port, 16) == port and fields[3] == "0A":
                    found.append(address)
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
def test_run_command_listens_on_loopback_only(tmp_path):
    port = free_port()
    env = {**server_environ(), "KVAPP_DATABASE": str(tmp_path / "kv.sqlite3")}
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvapp", "serve", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 15
        while not listening_addresses(port):
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the server did not start listening"
            time.sleep(0.05)
        # 0100007F is 127.0.0.1 in /proc's byte order; 0.0.0.0 would be 00000000.
        assert listening_addresses(port) == ["0100007F"]
        # All of 127/8 is loopback: a server on 0.0.0.0 would accept this one.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.2", port), timeout=5).close()
        status, _, body = curl(f"http://127.0.0.1:{port}/set?password={SECRET}")
        assert (status, body) == (200, b"stored 1 key\n")
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    output = log_path.read_text()
    assert f"on http://127.0.0.1:{port}" in output
    # The run command logs through the same setup as wsgi.py.
    assert '"GET /set?password=***" 200 13 ' in output
    assert SECRET not in output
