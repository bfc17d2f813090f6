"""What real waitress answers to malformed and oversized requests, over raw sockets.

The server is the project's own run command, `python -m kvapp serve`, with
small limits from the environment, so these tests also show that the run
command hands kvapp's settings to waitress.  Every row of the "Malformed
requests" table in docs/guarantees.md is one case here.
"""

from __future__ import annotations

import resource
import socket
import time
import uuid

import pytest
from helpers import KvappServer, Server

pytestmark = pytest.mark.slow

MAX_BODY = 1000
MAX_HEADER = 2048
CHANNEL_TIMEOUT = 2
LIMITS = {
    "KVAPP_MAX_BODY_BYTES": str(MAX_BODY),
    "KVAPP_MAX_REQUEST_HEADER_SIZE": str(MAX_HEADER),
    "KVAPP_CHANNEL_TIMEOUT": str(CHANNEL_TIMEOUT),
}
# waitress closes a silent connection after channel_timeout, checked every
# channel_timeout/2 seconds from its event loop, which wakes at least every second.
SILENT_CLOSE_BOUND = CHANNEL_TIMEOUT * 1.5 + 1 + 2  # + 2 s for a loaded machine
FORM = b"Content-Type: application/x-www-form-urlencoded\r\n"


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    folder = tmp_path_factory.mktemp("limits")
    server = KvappServer(folder / "kv.sqlite3", env=LIMITS, log_path=folder / "server.log").start()
    yield server
    server.kill()


def exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send data; return every byte the server sends until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_until_closed(sock, timeout)


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    received = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            # The server closed with unread request bytes; what it sent first is kept.
            break
        if not data:
            return received
        received += data
    raise AssertionError(f"the server kept the connection open; it sent {received[:200]!r}")


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def stored(server: Server, key: str) -> bool:
    answer = exchange(
        server.port, f"GET /get?key={key} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode()
    )
    assert status_of(answer) in (200, 404), answer
    return status_of(answer) == 200


def post(key: str, headers: bytes, body: bytes = b"", path: str = "/set") -> bytes:
    """A POST of key=1 whose framing headers are given: the key shows whether it was stored."""
    return f"POST {path} HTTP/1.1\r\nHost: localhost\r\n".encode() + FORM + headers + b"\r\n" + body


def chunked(body: bytes, size: int = 256) -> bytes:
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"


BOTH_FRAMINGS = (
    b"\r\n\r\nbad request: Content-Length and Transfer-Encoding were both sent; send one of them\n"
)
TOO_LARGE = b"\r\n\r\nthe request body is over the limit of %d bytes\n" % MAX_BODY

# (id, request with {key} where a key goes, status, a phrase of waitress's answer)
ROWS = [
    ("garbage request line", b"GET/set?{key}=1\r\n\r\n", 400, b"Start line is invalid"),
    ("lower-case method", b"get /set?{key}=1 HTTP/1.1\r\n\r\n", 400, b"Malformed HTTP method"),
    ("bare LF in request line", b"GET /set?{key}=1 HTTP/1.1\nHost: x\r\n\r\n", 400, b"Bare CR"),
    ("bare LF in a header", b"GET /set?{key}=1 HTTP/1.1\r\nHost: x\nA: b\r\n\r\n", 400, b"Bare"),
    ("bare CR in a header", b"GET /set?{key}=1 HTTP/1.1\r\nHost: x\rA: b\r\n\r\n", 400, b"Bare"),
    # waitress quotes the line: at most 120 characters of it come back, escaped.
    (
        "bare CR in a long hostile header",
        b"GET /set?{key}=1 HTTP/1.1\r\nHost: x\rA: " + b"\x01\x7f\xff\x1b[2J" * 50 + b"\r\n\r\n",
        400,
        b"\\x01\\x7f\\xff\\x1b[2J",
    ),
    (
        "header without colon",
        b"GET /set?{key}=1 HTTP/1.1\r\nHost x\r\n\r\n",
        400,
        b"Invalid header",
    ),
    (
        "space before colon",
        b"GET /set?{key}=1 HTTP/1.1\r\nHost : x\r\n\r\n",
        400,
        b"Invalid header",
    ),
    ("NUL in a header", b"GET /set?{key}=1 HTTP/1.1\r\nA: \x00\r\n\r\n", 400, b"Invalid header"),
    (
        "folded first header",
        b"GET /set?{key}=1 HTTP/1.1\r\n A: b\r\n\r\n",
        400,
        b"Malformed header",
    ),
    ("raw UTF-8 in the URI", "GET /set?{key}=é HTTP/1.1\r\n\r\n".encode(), 400, b"Bad URI"),
    ("raw byte 0xFF in the URI", b"GET /set?{key}=\xff HTTP/1.1\r\n\r\n", 400, b"Bad URI"),
    (
        "request line over max_request_header_size",
        b"GET /set?{key}=" + b"v" * MAX_HEADER + b" HTTP/1.1\r\n\r\n",
        431,
        b"the request line and headers are over the limit of %d bytes\n" % MAX_HEADER,
    ),
    ("Content-Length not a number", post("{key}", b"Content-Length: abc\r\n"), 400, b"Content-Len"),
    ("negative Content-Length", post("{key}", b"Content-Length: -1\r\n"), 400, b"Content-Length"),
    ("Content-Length with a sign", post("{key}", b"Content-Length: +5\r\n"), 400, b"Content-Len"),
    ("Content-Length 1e3", post("{key}", b"Content-Length: 1e3\r\n"), 400, b"Content-Length"),
    (
        "duplicate Content-Length",
        post("{key}", b"Content-Length: 5\r\nContent-Length: 5\r\n", b"{key}=1"),
        400,
        b"Content-Length is invalid",
    ),
    (
        "conflicting Content-Length",
        post("{key}", b"Content-Length: 5\r\nContent-Length: 6\r\n", b"{key}=1"),
        400,
        b"Content-Length is invalid",
    ),
    (
        "Content-Length over max_body_bytes",
        post("{key}", b"Content-Length: %d\r\n" % (MAX_BODY + 1)),
        413,
        b"the request body is over the limit of %d bytes\n" % MAX_BODY,
    ),
    (
        "chunked body over max_body_bytes",
        post("{key}", b"Transfer-Encoding: chunked\r\n", chunked(b"{key}=" + b"v" * MAX_BODY)),
        413,
        b"the request body is over the limit of %d bytes\n" % MAX_BODY,
    ),
    (
        "bad chunk size",
        post("{key}", b"Transfer-Encoding: chunked\r\n", b"zz\r\n{key}=1\r\n0\r\n\r\n"),
        400,
        b"Invalid chunk size",
    ),
    (
        "Content-Length and Transfer-Encoding: chunked",
        post("{key}", b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", chunked(b"{key}=1")),
        400,
        b"Content-Length and Transfer-Encoding were both sent",
    ),
    (
        "HTTP/1.0 with Content-Length and Transfer-Encoding",
        post("{key}", b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"{key}=1").replace(
            b"HTTP/1.1", b"HTTP/1.0"
        ),
        400,
        b"Content-Length and Transfer-Encoding were both sent",
    ),
    ("Transfer-Encoding gzip", post("{key}", b"Transfer-Encoding: gzip\r\n"), 501, b"not supp"),
    ("Transfer-Encoding identity", post("{key}", b"Transfer-Encoding: identity\r\n"), 501, b"not"),
    (
        "Transfer-Encoding gzip, chunked",
        post("{key}", b"Transfer-Encoding: gzip, chunked\r\n"),
        501,
        b"not supported",
    ),
]


@pytest.mark.parametrize(
    ("request_bytes", "status", "phrase"),
    [row[1:] for row in ROWS],
    ids=[row[0] for row in ROWS],
)
def test_waitress_refuses_and_nothing_is_stored(limited, request_bytes, status, phrase):
    key = "k" + uuid.uuid4().hex[:12]
    answer = exchange(limited.port, request_bytes.replace(b"{key}", key.encode()))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert status_of(answer) == status, answer
    assert phrase in body, answer
    assert b"Connection: close" in head, "waitress closes the connection after an error"
    assert b"Content-Type: text/plain; charset=utf-8" in head
    # In kvapp's form (kvapp.refusals): one line, and the headers of every answer.
    assert body.endswith(b"\n") and body.count(b"\n") == 1 and len(body) < 200, body
    assert b"X-Content-Type-Options: nosniff" in head and b"Cache-Control: no-store" in head
    assert b"Content-Security-Policy: default-src 'none'; sandbox" in head
    assert not stored(limited, key)


def test_the_header_limit_counts_every_byte_up_to_the_blank_line(limited):
    def request(size: int) -> bytes:
        start = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nX-Pad: "
        return start + b"p" * (size - len(start) - 4) + b"\r\n\r\n"

    assert len(request(MAX_HEADER)) == MAX_HEADER
    assert status_of(exchange(limited.port, request(MAX_HEADER))) == 200
    answer = exchange(limited.port, request(MAX_HEADER + 1))
    assert status_of(answer) == 431, answer


def test_a_body_of_max_body_bytes_is_stored_one_byte_more_is_refused_before_it_is_read(limited):
    key = "k" + uuid.uuid4().hex[:12]
    body = f"{key}=".encode().ljust(MAX_BODY, b"v")
    answer = exchange(
        limited.port, post(key, b"Connection: close\r\nContent-Length: %d\r\n" % len(body), body)
    )
    assert status_of(answer) == 200, answer
    assert stored(limited, key)
    # One byte more: waitress answers from the headers alone (kvapp's own
    # check never sees this request), in kvapp's words (kvapp.refusals).
    key = "k" + uuid.uuid4().hex[:12]
    answer = exchange(limited.port, post(key, b"Content-Length: %d\r\n" % (MAX_BODY + 1)))
    assert status_of(answer) == 413 and answer.endswith(TOO_LARGE), answer
    assert not stored(limited, key)


def test_a_small_chunked_body_is_stored(limited):
    key = "k" + uuid.uuid4().hex[:12]
    body = chunked(f"{key}=chunked+value".encode(), size=5)
    answer = exchange(
        limited.port, post(key, b"Connection: close\r\nTransfer-Encoding: chunked\r\n", body)
    )
    assert status_of(answer) == 200, answer
    got = exchange(limited.port, f"GET /get?key={key} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
    assert got.endswith(b"\r\n\r\nchunked value")


def test_content_length_with_chunked_is_refused_and_the_pipelined_request_is_not_served(limited):
    """RFC 9112 section 6.1: a server may refuse both framings, and must close after answering."""
    key = "k" + uuid.uuid4().hex[:12]
    body = chunked(f"{key}=1".encode())
    headers = b"Content-Length: 100\r\nTransfer-Encoding: chunked\r\n"
    behind = f"GET /set?{key}b=1 HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
    answer = exchange(limited.port, post(key, headers, body) + behind)
    assert status_of(answer) == 400, answer
    assert answer.endswith(BOTH_FRAMINGS), answer
    assert answer.count(b"HTTP/1.1 ") == 1, "the request behind it was served"
    assert not stored(limited, key) and not stored(limited, key + "b")


def test_expect_100_continue_over_the_limit_is_refused_at_once(limited):
    """RFC 9110 section 10.1.1: a status known from the headers may come at once, not 100."""
    key = "k" + uuid.uuid4().hex[:12]
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as sock:
        sock.sendall(post(key, b"Expect: 100-continue\r\nContent-Length: %d\r\n" % (5 * MAX_BODY)))
        answer = read_until_closed(sock, 10)  # waitress sent 100 Continue and waited for the body
    assert status_of(answer) == 413 and answer.endswith(TOO_LARGE), answer
    assert b"100 Continue" not in answer
    assert not stored(limited, key)


def test_expect_100_continue_within_the_limit_gets_100_and_is_stored(limited):
    key = "k" + uuid.uuid4().hex[:12]
    body = f"{key}=1".encode()
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as sock:
        headers = b"Connection: close\r\nExpect: 100-continue\r\nContent-Length: %d\r\n"
        sock.sendall(post(key, headers % len(body)))
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        answer = read_until_closed(sock, 10)
    assert status_of(answer) == 200, answer
    assert stored(limited, key)


def test_a_content_length_of_5000_digits_is_dropped_and_the_server_stays_up(limited):
    """waitress's int() raises on over 4300 digits: it logs, closes, and sends nothing."""
    key = "k" + uuid.uuid4().hex[:12]
    answer = exchange(limited.port, post(key, b"Content-Length: " + b"9" * 5000 + b"\r\n"))
    assert answer == b"" or 400 <= status_of(answer) < 500, answer
    assert not stored(limited, key)
    assert status_of(exchange(limited.port, b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")) == 200


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET / HTTP/1.1\nHost: x\n\n",  # LF only: the header block never ends
        post("k", b"Content-Length: 10\r\n", b"k=1"),  # body shorter than Content-Length
    ],
    ids=["header block of bare LFs", "body shorter than Content-Length"],
)
def test_an_unfinished_request_gets_no_answer_and_is_closed_after_channel_timeout(
    limited, request_bytes
):
    start = time.monotonic()
    answer = exchange(limited.port, request_bytes, timeout=SILENT_CLOSE_BOUND + 5)
    waited = time.monotonic() - start
    assert answer == b""
    assert CHANNEL_TIMEOUT <= waited <= SILENT_CLOSE_BOUND, waited


def test_waitress_serve_without_flags_buffers_a_chunked_body_that_kvapp_then_refuses(
    server_factory,
):
    """`waitress-serve` does not know max_body_bytes: it reads the whole chunked body."""
    server = server_factory(env={"KVAPP_MAX_BODY_BYTES": str(MAX_BODY)})
    key = "k" + uuid.uuid4().hex[:12]
    body = chunked(f"{key}=".encode() + b"v" * (4 * MAX_BODY))
    headers = b"Connection: close\r\nTransfer-Encoding: chunked\r\n"
    answer = exchange(server.port, post(key, headers, body))
    assert status_of(answer) == 413, answer
    # kvapp's wording: the app saw the request, so waitress had read all of it.
    assert b"the request body is %d bytes" % (4 * MAX_BODY + len(key) + 1) in answer, answer
    assert not stored(server, key)


@pytest.fixture
def many_descriptors():
    """Raise RLIMIT_NOFILE for this process and the servers it starts; restore it after."""
    need = 2048
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(hard, need)))
        except (ValueError, OSError):
            pytest.skip(f"RLIMIT_NOFILE is {soft}/{hard} and cannot be raised to {need}")
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_over_1024_connections_do_not_crash_the_server(many_descriptors, server_factory):
    """select() refuses descriptors above 1023 and waitress's loop dies with it; kvapp
    asks waitress for poll()."""
    server = server_factory(env={"KVAPP_CONNECTION_LIMIT": "1200"}, kind=KvappServer)
    idle = []
    try:
        for _ in range(1100):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
        answer = exchange(server.port, b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        assert status_of(answer) == 200, answer
        assert server.proc.poll() is None
    finally:
        for sock in idle:
            sock.close()
