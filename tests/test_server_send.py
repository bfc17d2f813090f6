"""How kvapp's waitress task and channel send: waitress's bytes, and no sent bytes kept.

kvapp.server.Task sends an answer's head with its first body bytes in one
call, and frames a streamed chunk without copying it; Channel sends at
once when nothing waits, and starts a fresh buffer once all is sent.  A
real waitress server of each kind runs in this process on a kernel-chosen
port, and raw sockets read what goes over the wire.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tools import in_process_server, read_answer, wait_for
from waitress import create_server, wasyncore

from kvapp import server

SPEC: dict[str, Any] = {}  # what the app answers next: set by each test, one request at a time


def app(environ, start_response):
    headers = list(SPEC.get("headers", []))
    start_response(SPEC.get("status", "200 OK"), headers)
    chunks = SPEC.get("chunks", [b"ok"])
    if SPEC.get("as_list"):
        return list(chunks)
    hold = SPEC.get("hold")
    return sent_then(chunks, hold) if hold else iter(chunks)  # no len(): no Content-Length


def sent_then(chunks: list[bytes], hold: threading.Event) -> Iterator[bytes]:
    """Yield chunks, then wait for hold before the answer ends: a stream still open."""
    yield from chunks
    hold.wait(30)


def kvapp_server():
    """Serve app with kvapp's Channel, Task and MainLoop; yield the port and the server."""
    return in_process_server(app, threads=1)


@contextmanager
def waitress_server() -> Iterator[int]:
    """Serve app with waitress 3.0.2 as it comes (its channel, task and loop); yield the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    plain = create_server(app, sockets=[sock], threads=1)
    stop = threading.Event()

    def passes() -> None:  # waitress's own loop, one pass at a time, until stop
        while not stop.is_set():
            wasyncore.loop(timeout=0.05, map=plain._map, count=1)

    thread = threading.Thread(target=passes)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        thread.join()  # before the sockets close under its select()
        plain.task_dispatcher.shutdown()
        for dispatcher in list(plain._map.values()):
            dispatcher.close()


def exchange(port: int, request: bytes) -> bytes:
    """Send request, read until the server closes; return what came, its Date line blanked."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        got = b""
        while chunk := sock.recv(1 << 20):
            got += chunk
    head, sep, body = got.partition(b"\r\n\r\n")
    lines = [b"Date: -" if line.startswith(b"Date: ") else line for line in head.split(b"\r\n")]
    return b"\r\n".join(lines) + sep + body


def chunk_sizes() -> st.SearchStrategy[list[int]]:
    return st.lists(
        st.one_of(st.integers(0, 40), st.integers(8000, 9000), st.integers(60_000, 300_000)),
        max_size=5,
    )


@st.composite
def answers(draw) -> dict[str, Any]:
    """An answer and the request that asks for it, over the cases waitress's write tells apart."""
    sizes = draw(chunk_sizes())
    chunks = [bytes([65 + n % 26]) * size for n, size in enumerate(sizes)]
    total = sum(sizes)
    status = draw(
        st.sampled_from(["200 OK", "404 Not Found", "204 No Content", "304 Not Modified"])
    )
    headers = [("Content-Type", "text/plain")]
    length = draw(st.sampled_from(["none", "exact", "short", "long"]))
    if length == "exact":
        headers.append(("Content-Length", str(total)))
    elif length == "short":  # the app writes more than it said: waitress cuts the rest
        headers.append(("Content-Length", str(max(0, total - draw(st.integers(1, 50))))))
    elif length == "long":  # fewer: waitress closes the connection
        headers.append(("Content-Length", str(total + draw(st.integers(1, 50)))))
    method = draw(st.sampled_from(["GET", "HEAD"]))
    version = draw(st.sampled_from(["1.0", "1.1"]))
    close = "Connection: close\r\n" if version == "1.1" else ""
    request = f"{method} /x HTTP/{version}\r\nHost: x\r\n{close}\r\n".encode()
    as_list = draw(st.booleans())
    return {
        "status": status,
        "headers": headers,
        "chunks": chunks,
        "as_list": as_list,
        "request": request,
    }


@pytest.fixture(scope="module")
def ports() -> Iterator[tuple[int, int]]:
    """The ports of a kvapp-channel server and a plain waitress one, both serving app."""
    with kvapp_server() as (ours, _), waitress_server() as theirs:
        yield ours, theirs


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answer=answers())
def test_what_goes_over_the_wire_is_what_waitress_sends(ports, answer):
    SPEC.clear()
    SPEC.update(answer)
    ours = exchange(ports[0], answer["request"])
    theirs = exchange(ports[1], answer["request"])
    assert ours == theirs


def kept_bytes(channel: Any) -> int:
    """Return the bytes the channel's output buffers hold in memory, sent or not."""
    kept = 0
    for outbuf in channel.outbufs:
        if outbuf.buf is None:
            kept += len(outbuf.strbuf)
        else:
            kept += len(outbuf.buf.file.getvalue())
    return kept


def dechunk(body: bytes) -> bytes:
    """Return the data of a whole chunked body (RFC 9112 section 7.1)."""
    data, at = [], 0
    while True:
        end = body.index(b"\r\n", at)
        size = int(body[at:end], 16)
        if size == 0:
            return b"".join(data)
        data.append(body[end + 2 : end + 2 + size])
        at = end + 2 + size + 2


def only_channel(waitress: Any) -> Any:
    found = [ch for ch in list(waitress._map.values()) if isinstance(ch, server.Channel)]
    assert len(found) == 1
    return found[0]


def test_a_stream_keeps_none_of_the_bytes_it_sent():
    # A watch stream lives as long as its client: waitress's buffer kept every
    # byte it sent, up to 16 MiB a connection.
    chunks = [bytes([n]) * 100_000 for n in range(30)]
    hold = threading.Event()
    SPEC.clear()
    SPEC.update(chunks=chunks, hold=hold)
    with kvapp_server() as (port, waitress):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            framed = sum(len(b"%X\r\n" % len(chunk)) + len(chunk) + 2 for chunk in chunks)
            answer = b""
            while len(answer.partition(b"\r\n\r\n")[2]) < framed:
                chunk = sock.recv(1 << 20)
                assert chunk, "closed mid-answer"
                answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            assert b"Transfer-Encoding: chunked" in head
            wait_for(lambda: kept_bytes(only_channel(waitress)) == 0, timeout=10)
            hold.set()
            while not body.endswith(b"\r\n0\r\n\r\n"):
                chunk = sock.recv(1 << 20)
                assert chunk, "closed mid-answer"
                body += chunk
            assert dechunk(body) == b"".join(chunks)


def test_an_answer_a_client_read_late_leaves_no_bytes_in_the_buffer():
    # The socket fills, so the rest waits in the buffer and the loop sends it.
    big = 20 * 1024 * 1024
    SPEC.clear()
    SPEC.update(
        headers=[("Content-Length", str(big))],
        chunks=[bytes([n]) * (1024 * 1024) for n in range(20)],
    )
    with kvapp_server() as (port, waitress):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(1)  # not reading yet
            answer = read_answer(sock)
            assert answer.partition(b"\r\n\r\n")[2] == b"".join(SPEC["chunks"])
            wait_for(lambda: kept_bytes(only_channel(waitress)) == 0, timeout=10)
            SPEC.update(headers=[], chunks=[b"after"], as_list=True)
            sock.sendall(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_answer(sock).endswith(b"\r\n\r\nafter")
