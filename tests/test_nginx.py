"""kvapp behind a real nginx running deploy/nginx.conf (its EDIT values replaced).

The end-to-end API tests of test_e2e, test_api_server and test_security_e2e run
here again through nginx: their `server` fixture is overridden below by one
whose url and port are nginx's.
"""

from __future__ import annotations

import http.client
import select
import socket
import threading
import time
from pathlib import Path

import pytest
from helpers import curl, free_port
from proxykit import (
    NGINX,
    NGINX_WORKERS,
    OPENSSL,
    SITE,
    Kvapp,
    Nginx,
    connections_to,
    render_site,
    self_signed,
)

# The API tests, run again through nginx (pytest collects what a module imports).
# /metrics across workers lags by up to a flush interval; tests/test_workers.py covers it.
from test_api_server import (  # noqa: F401
    test_chunked_put_and_head,
    test_keys_with_slashes_plus_and_utf8_through_curl,
)
from test_e2e import (  # noqa: F401
    test_chunked_post_body,
    test_concurrent_writers_through_the_real_server,
    test_curl_reuses_one_connection_for_several_urls,
    test_many_requests_on_one_connection,
    test_pipelined_requests_on_one_connection,
    test_post_large_value_with_curl_data_urlencode,
    test_set_get_head_and_index,
)
from test_security_e2e import (  # noqa: F401
    raw,
    test_waitress_refuses_a_foreign_host_and_a_cross_site_post,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx)"),
]

NAME = "kv.test"  # the public name of these tests: in server_name and allowed_hosts
NAMES = f"{NAME} localhost 127.0.0.1"
ALLOWED_HOSTS = f"localhost 127.0.0.1 [::1] {NAME}"
CLIENT = "127.0.0.2"  # a client address that is not nginx's (127.0.0.1)
MAX_BODY = 4 * 1024 * 1024


class Stack:
    """nginx on a free port in front of kvapp; url and port are nginx's."""

    def __init__(self, kvapp: Kvapp, nginx: Nginx, port: int, tls_port: int = 0) -> None:
        self.kvapp, self.nginx = kvapp, nginx
        self.port, self.tls_port = port, tls_port
        self.db_path = kvapp.db_path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.kvapp.output()


@pytest.fixture
def stack_factory(tmp_path: Path, db_path: Path):
    """Return a function starting kvapp and nginx in front of it; both stop at teardown."""
    started: list[Kvapp | Nginx] = []  # stopped in reverse order

    def start(env: dict[str, str] | None = None, tls: bool = False) -> Stack:
        n = len(started)
        env = {
            "KVAPP_TRUSTED_PROXY": "127.0.0.1",
            "KVAPP_ALLOWED_HOSTS": ALLOWED_HOSTS,
            **(env or {}),
        }
        kvapp = Kvapp(db_path, tmp_path / f"kvapp-{n}.log", env)
        started.append(kvapp)
        kvapp.start()
        port, tls_port = free_port(), 0
        tls_settings = None
        if tls:
            tls_port = free_port()
            tls_settings = (f"127.0.0.1:{tls_port}", *certificate(tmp_path))
        upstream, listen = f"127.0.0.1:{kvapp.port}", f"127.0.0.1:{port}"
        site = render_site(upstream, listen, NAMES, webroot(tmp_path), tls_settings)
        nginx = Nginx(tmp_path / f"nginx-{n}", site)
        started.append(nginx)
        nginx.start(port)
        return Stack(kvapp, nginx, port, tls_port)

    yield start
    for process in reversed(started):
        process.stop()


@pytest.fixture
def server(stack_factory) -> Stack:
    """What the imported API tests talk to: nginx, with kvapp behind it."""
    return stack_factory()


ACME_TOKEN = "Xy3-token"


def webroot(folder: Path) -> Path:
    """Return a certbot --webroot folder holding one http-01 challenge file."""
    challenges = folder / "webroot" / ".well-known" / "acme-challenge"
    challenges.mkdir(parents=True, exist_ok=True)
    (challenges / ACME_TOKEN).write_text(f"{ACME_TOKEN}.key-authorization")
    return folder / "webroot"


def certificate(folder: Path) -> tuple[Path, Path]:
    if OPENSSL is None:
        pytest.skip("openssl is not installed (apt-get install openssl)")
    return self_signed(folder, NAME)


# -- the shipped file ------------------------------------------------------------


def test_the_shipped_file_is_valid_as_it_is(tmp_path: Path):
    """What a user copies to /etc/nginx/conf.d/ passes `nginx -t` unchanged."""
    nginx = Nginx(tmp_path, SITE.read_text(encoding="utf-8"))
    result = nginx.check()
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_every_edit_line_is_replaced_and_nothing_else(tmp_path: Path):
    shipped = SITE.read_text(encoding="utf-8").splitlines()
    rendered = render_site("127.0.0.1:1", "127.0.0.1:2", NAMES, tmp_path).splitlines()
    changed = [old for old, new in zip(shipped, rendered, strict=True) if old != new]
    assert changed and all("# EDIT" in line for line in changed)


# -- the API through nginx ----------------------------------------------------------


def test_kv_resources_and_listing_through_nginx(server):
    url = server.url
    png = ("-H", "Content-Type: image/png", "--data-binary", "@-")
    status, headers, _ = curl("-X", "PUT", *png, f"{url}/kv/pics/a", data=b"\x89PNG\x00")
    assert status == 201
    assert headers["location"] == "/kv/pics/a"
    etag = headers["etag"]
    assert curl("-X", "PUT", "--data-binary", "@-", f"{url}/kv/pics/b", data=b"b")[0] == 201

    status, headers, body = curl(f"{url}/kv/pics/a")
    assert (status, body, headers["content-type"]) == (200, b"\x89PNG\x00", "image/png")
    assert headers["etag"] == etag
    assert headers["cache-control"] == "no-cache"  # nginx adds no caching of its own
    assert curl("-H", f"If-None-Match: {etag}", f"{url}/kv/pics/a")[0] == 304

    status, _, body = curl(f"{url}/kv/?prefix=pics/")
    assert (status, body) == (200, b"pics/a\npics/b\n")
    assert curl("-X", "DELETE", f"{url}/kv/pics/a")[0] == 204
    assert curl(f"{url}/kv/pics/a")[0] == 404
    assert curl(f"{url}/kv/")[2] == b"pics/b\n"
    assert curl(f"{url}/set?x=1")[2] == b"stored 1 key\n"
    assert curl(f"{url}/get?key=x")[2] == b"1"
    # Every request above reached kvapp, through nginx (from 127.0.0.1).
    assert len(server.kvapp.access_lines()) == 10


def test_a_body_over_max_body_bytes_is_refused_by_nginx(server):
    # Exactly max_body_bytes passes nginx: kvapp answers (the value is over max_value_bytes).
    status, headers, body = curl("-X", "PUT", "--data-binary", "@-", f"{server.url}/kv/big",
                                 data=b"x" * MAX_BODY)  # fmt: skip
    assert status == 413
    assert body == b"the request body is 4194304 bytes; the limit is 1048576\n"
    assert len(server.kvapp.access_lines()) == 1

    # One byte more: nginx refuses it before reading it; kvapp never sees it.
    for args in (["-X", "PUT"], ["-X", "PUT", "-H", "Transfer-Encoding: chunked"]):
        status, headers, body = curl(*args, "--data-binary", "@-", f"{server.url}/kv/big",
                                     data=b"x" * (MAX_BODY + 1))  # fmt: skip
        assert status == 413
        assert body == b"the request body is over 4194304 bytes (max_body_bytes)\n"
        assert headers["content-type"] == "text/plain; charset=utf-8"
        assert headers["x-content-type-options"] == "nosniff"
    assert len(server.kvapp.access_lines()) == 1
    assert curl(f"{server.url}/kv/big")[0] == 404


def test_long_request_lines_and_headers(server):
    value = "v" * 40_000  # a request line over nginx's default 8 KiB buffers
    status, _, body = curl(f"{server.url}/set?long={value}")
    assert (status, body) == (200, b"stored 1 key\n")
    assert curl(f"{server.url}/get?key=long")[2] == value.encode()
    assert curl(f"{server.url}/set?long={'v' * 70_000}")[0] == 414  # nginx: over one buffer
    headers = ("-H", f"X-A: {'a' * 40_000}", "-H", f"X-B: {'b' * 40_000}")
    status, _, body = curl(*headers, f"{server.url}/set?k=v")
    assert status == 431  # kvapp's max_request_header_size (64 KiB), as without nginx
    # nginx answered the 414 itself; waitress refused the 431, and kvapp logged it too.
    lines = server.kvapp.access_lines()
    assert len(lines) == 3 and '"GET /" 431 ' in lines[2], lines


def test_kvapp_down_is_a_plain_text_502(server):
    server.kvapp.stop()
    status, headers, body = curl(f"{server.url}/get?key=k")
    assert status == 502
    assert body == b"kvapp is not answering (down or restarting); try again\n"
    assert headers["content-type"] == "text/plain; charset=utf-8"


# -- who the client is --------------------------------------------------------------


@pytest.mark.parametrize(
    ("trusted_proxy", "logged"), [("127.0.0.1", CLIENT), ("", "127.0.0.1")], ids=["trusted", "not"]
)
def test_kvapp_logs_the_client_nginx_saw(stack_factory, trusted_proxy, logged):
    stack = stack_factory({"KVAPP_TRUSTED_PROXY": trusted_proxy})
    forged = ("-H", "X-Forwarded-For: 203.0.113.9")  # nginx appends; kvapp takes the last
    status, _, _ = curl("--interface", CLIENT, *forged, f"{stack.url}/set?k=v")
    assert status == 200
    lines = stack.kvapp.access_lines()
    assert len(lines) == 1 and lines[0].startswith(f'{logged} "GET /set?k=***" 200 '), lines
    assert "203.0.113.9" not in stack.output()
    # nginx writes its access-log line once the answer is sent: wait for it.
    deadline = time.monotonic() + 10
    while not stack.nginx.access_lines() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stack.nginx.access_lines()[0].startswith(f"{CLIENT} ")


@pytest.mark.parametrize(
    ("request_bytes", "status", "by_kvapp"),
    [
        (b"GET /set?k=v HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n\r\n", 400, 0),
        (b"GET /set?k=v HTTP/1.1\r\n\r\n", 400, 0),
        # nginx forwards the authority of an absolute-form target as Host ($host).
        (b"GET http://evil.example/set?k=v HTTP/1.1\r\nHost: localhost\r\n\r\n", 400, 1),
        # Lenient, and no way in for a browser (which always sends a Host): nginx
        # gives an HTTP/1.0 request without Host the first server_name, and
        # keeps the name before the first colon of a malformed Host.
        (b"GET /set?k=v HTTP/1.0\r\n\r\n", 200, 1),
        (b"GET /set?k=v HTTP/1.1\r\nHost: localhost:4000:1\r\n\r\n", 200, 1),
    ],
    ids=["two-hosts", "http11-no-host", "absolute-form", "http10-no-host", "malformed"],
)
def test_bad_hosts_through_nginx(server, request_bytes, status, by_kvapp):
    answer = raw(server.port, request_bytes)
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:300]
    assert len(server.kvapp.access_lines()) == by_kvapp
    assert curl(f"{server.url}/get?key=k")[0] == (200 if status == 200 else 404)


def test_a_forwarded_host_from_a_client_is_not_believed(server):
    url = f"{server.url}/set?k=v"
    status, _, body = curl("-H", "Host: evil.example", "-H", f"X-Forwarded-Host: {NAME}", url)
    assert status == 400 and b"evil.example" in body
    status, _, _ = curl("-H", f"Host: {NAME}", "-H", "X-Forwarded-Host: evil.example", url)
    assert status == 200


# -- connections -------------------------------------------------------------------


def test_nginx_reuses_its_connections_to_kvapp(server):
    peers = set()
    for n in range(30):
        # A new client connection each time; nginx's connection to kvapp stays.
        assert curl(f"{server.url}/set?k{n}=v")[0] == 200
        peers |= {
            peer for peer, state in connections_to(server.kvapp.port) if state == "ESTABLISHED"
        }
    idle = [peer for peer, state in connections_to(server.kvapp.port) if state == "ESTABLISHED"]
    assert idle, "nginx closed its connection to kvapp after the requests"
    # At most one connection per nginx worker, for 30 requests one after another.
    assert 1 <= len(peers) <= NGINX_WORKERS, peers


# -- slow clients ------------------------------------------------------------------

CONNECTION_LIMIT = 8
TRICKLERS = 24  # 3 x connection_limit: more than waitress takes at once
ROUNDS = 6  # each trickler sends one header line a second for this many seconds


def trickle(port: int, stop: threading.Event, done: threading.Event) -> list[socket.socket]:
    """Open TRICKLERS connections that each send a request one header a second.

    Return the sockets; a thread keeps them trickling for ROUNDS seconds (or
    until stop), then sets done and closes them.  No request is ever finished.
    """
    sockets = []
    for _ in range(TRICKLERS):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"GET /get?key=slow HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        sockets.append(sock)

    def run() -> None:
        for n in range(ROUNDS):
            if stop.wait(1.0):
                break
            for sock in sockets:
                try:
                    sock.sendall(f"X-Slow-{n}: x\r\n".encode())
                except OSError:
                    pass
        done.set()
        for sock in sockets:
            sock.close()

    threading.Thread(target=run, daemon=True).start()
    return sockets


@pytest.mark.parametrize("front", ["waitress", "nginx"])
def test_slow_clients_do_not_hold_up_a_normal_request(stack_factory, front):
    """With waitress alone, TRICKLERS connections trickling headers take every
    connection slot, and a normal request waits until they go; nginx holds them
    itself and serves the normal request while they trickle on."""
    stack = stack_factory({"KVAPP_CONNECTION_LIMIT": str(CONNECTION_LIMIT)})
    port = stack.kvapp.port if front == "waitress" else stack.port
    stop, done = threading.Event(), threading.Event()
    trickle(port, stop, done)
    try:
        time.sleep(0.5)  # let the server accept what it will
        assert not done.is_set()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=ROUNDS + 20)
        conn.request("GET", "/set?normal=1")
        response = conn.getresponse()
        answered_while_trickling = not done.is_set()
        assert (response.status, response.read()) == (200, b"stored 1 key\n")
        conn.close()
    finally:
        stop.set()
    assert answered_while_trickling == (front == "nginx")
    # No trickler's request ever reached kvapp.
    assert [line for line in stack.kvapp.access_lines() if "slow" in line] == []


def test_nginx_drops_a_trickling_client_after_client_header_timeout(server):
    """waitress restarts channel_timeout at every byte, so a client sending a header
    line every second holds a connection forever; nginx bounds the whole header."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /get?key=slow HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        for n in range(30):  # client_header_timeout is 10 s
            time.sleep(1)
            try:
                sock.sendall(f"X-Slow-{n}: x\r\n".encode())
                readable, _, _ = select.select([sock], [], [], 0)
                closed = bool(readable) and sock.recv(65536) == b""
            except ConnectionError:  # reset by nginx (reset_timedout_connection)
                closed = True
            if closed:
                break
    assert closed, "nginx still reads headers after 30 s"
    assert 5 <= n < 30  # it was closed while trickling, not refused at once
    assert server.kvapp.access_lines() == []


# -- TLS ------------------------------------------------------------------------------


def test_tls_variant_redirects_http_and_checks_https_origins(stack_factory, tmp_path: Path):
    stack = stack_factory(tls=True)
    https = f"https://{NAME}:{stack.tls_port}"
    tls = (
        "--cacert",
        str(tmp_path / "cert.pem"),
        "--resolve",
        f"{NAME}:{stack.tls_port}:127.0.0.1",
    )

    status, headers, _ = curl("-H", f"Host: {NAME}", f"{stack.url}/set?k=v")
    assert status == 308
    assert headers["location"] == f"https://{NAME}/set?k=v"
    # Let's Encrypt's challenge stays on plain http; nothing else does.
    challenge = f"{stack.url}/.well-known/acme-challenge/{ACME_TOKEN}"
    status, _, body = curl("-H", f"Host: {NAME}", challenge)
    assert (status, body) == (200, f"{ACME_TOKEN}.key-authorization".encode())
    assert stack.kvapp.access_lines() == []  # plain http never reaches kvapp

    status, headers, body = curl(*tls, f"{https}/set?k=v")
    assert (status, body) == (200, b"stored 1 key\n")
    assert headers["strict-transport-security"] == "max-age=31536000"
    assert curl(*tls, f"{https}/get?key=k")[2] == b"v"
    # nginx's own answers too: a location with add_header of its own
    # inherits none of the server's.
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (5 * 1024 * 1024))
    status, headers, _ = curl(*tls, "-X", "PUT", "--data-binary", f"@{big}", f"{https}/kv/big")
    assert status == 413
    assert headers["strict-transport-security"] == "max-age=31536000"

    # kvapp knows the request came over https (X-Forwarded-Proto from nginx).
    write = ("-H", "Sec-Fetch-Site: same-origin", "-d", "w=1", f"{https}/set")
    assert curl(*tls, "-H", f"Origin: https://{NAME}:{stack.tls_port}", *write)[0] == 200
    status, _, body = curl(*tls, "-H", f"Origin: http://{NAME}:{stack.tls_port}", *write)
    assert status == 403 and b"Origin" in body
