"""kvapp's main loop for waitress: idle connections cost nothing, and nothing is missed.

A real waitress server (kvapp's Channel and MainLoop) runs in this process
on a kernel-chosen port, driven by raw sockets; the loop passes in a thread
of its own.  The speed-up itself is the benchmark's (set-idle), never
asserted here.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from tools import in_process_server, read_answer

from kvapp import server
from kvapp.mainloop import MainLoop

ASKED: Counter = Counter()  # readable() calls by channel id


class CountingChannel(server.Channel):
    def readable(self) -> bool:
        ASKED[id(self)] += 1
        return super().readable()


BIG = 20 * 1024 * 1024  # above waitress's outbuf_high_watermark (16 MiB)


def app(environ, start_response):
    if environ["PATH_INFO"] == "/big":
        start_response("200 OK", [("Content-Length", str(BIG))])
        return (bytes([n]) * (1024 * 1024) for n in range(BIG // (1024 * 1024)))
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Length", str(len(body) + 2))])
    return [b"ok" + body]


@contextmanager
def running(pass_seconds: float = 60, **adjustments) -> Iterator[tuple[int, MainLoop]]:
    """Serve app with MainLoop on 127.0.0.1:<kernel's choice>; yield the port and the loop."""
    adjustments = {"threads": 2, "connection_limit": 1000, **adjustments}
    with in_process_server(app, CountingChannel, pass_seconds, **adjustments) as (port, waitress):
        yield port, waitress.main_loop


def ask(sock: socket.socket, body: bytes = b"", extra: str = "") -> bytes:
    """Send one keep-alive POST on sock; return its whole answer."""
    head = f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    sock.sendall(head.encode() + body)
    return read_answer(sock)


def channels_by_client_port(loop: MainLoop) -> dict[int, CountingChannel]:
    found = {}
    for channel in list(loop.map.values()):
        if isinstance(channel, CountingChannel):
            found[channel.addr[1]] = channel
    return found


def test_idle_connections_are_not_asked_while_others_are_served():
    with running() as (port, loop):
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(100)]
        busy = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            for sock in [*idle, busy]:  # each makes one request, then the idle ones stay silent
                assert ask(sock).endswith(b"\r\n\r\nok")
            channels = channels_by_client_port(loop)
            busy_channel = channels.pop(busy.getsockname()[1])
            assert len(channels) == 100
            # A client has its answer before the task thread marks its channel for
            # the loop on the way out (Channel.service), and that last ask may come
            # later: it did once, with another test process sharing the cores.  Start
            # counting once a round trip on the busy connection asks no idle one.
            for _ in range(50):
                before = Counter(ASKED)
                assert ask(busy, b"settle").endswith(b"oksettle")
                if all(ASKED[id(ch)] == before[id(ch)] for ch in channels.values()):
                    break
            else:
                raise AssertionError("idle connections were still asked after 50 round trips")
            before = Counter(ASKED)
            for number in range(50):
                assert ask(busy, b"%d" % number).endswith(b"ok%d" % number)
            # waitress's own loop (wasyncore.poll2) asks every channel on every
            # pass: each idle one 50 times or more.
            assert [ASKED[id(ch)] - before[id(ch)] for ch in channels.values()] == [0] * 100
            assert ASKED[id(busy_channel)] - before[id(busy_channel)] >= 50
            # Asked again after an event: each idle connection is still served.
            for number, sock in enumerate(idle):
                assert ask(sock, b"again%d" % number).endswith(b"okagain%d" % number)
        finally:
            for sock in [*idle, busy]:
                sock.close()


def test_a_100_continue_after_a_request_on_the_same_connection_is_sent():
    with running() as (port, _):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            for number in range(20):
                assert ask(sock, b"%d" % number).endswith(b"ok%d" % number)
                head = "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                sock.sendall(f"{head}Expect: 100-continue\r\n\r\n".encode())
                interim = b""
                while b"\r\n\r\n" not in interim:
                    chunk = sock.recv(1)
                    assert chunk, "closed before 100 Continue"
                    interim += chunk
                assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
                sock.sendall(b"body")
                assert read_answer(sock).endswith(b"okbody")


def test_idle_connections_past_channel_timeout_are_closed():
    # The maintenance marks them for closing without an event on their
    # sockets: the loop must ask every channel after it.
    # Passes at least once a second, as waitress's asyncore_loop_timeout makes them.
    with running(pass_seconds=1, channel_timeout=1, cleanup_interval=1) as (port, _):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            assert ask(sock).endswith(b"ok")
            assert sock.recv(1) == b""  # closed by the server, well before 30 s


def test_a_closed_connection_leaves_the_poll_set_and_its_fd_can_serve_again():
    with running() as (port, loop):
        for number in range(30):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                assert ask(sock, b"%d" % number, "Connection: close\r\n").endswith(b"ok%d" % number)
                assert sock.recv(1) == b""
        live = {fd for fd, ch in list(loop.map.items())}
        assert set(loop.registered) <= live


def test_an_answer_larger_than_the_high_watermark_reaches_a_late_reader():
    # The task thread fills the output buffer past 16 MiB, then waits for the
    # loop to send; the loop must hear of it though the channel had no event.
    with running() as (port, _):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(1)  # not reading yet: the socket's buffers fill up
            answer = read_answer(sock)
            assert answer.startswith(b"HTTP/1.1 200 OK")
            body = answer.partition(b"\r\n\r\n")[2]
            assert body == b"".join(bytes([n]) * (1024 * 1024) for n in range(20))
            assert ask(sock, b"after").endswith(b"okafter")  # and the connection goes on


def test_a_stop_lets_the_request_in_flight_finish_before_run_returns():
    # SIGTERM raises SystemExit in the loop (kvapp.workers); as with
    # waitress's own run(), running tasks finish before run() returns and the
    # caller closes the app (its database connections) under them.
    started, release, answered = threading.Event(), threading.Event(), threading.Event()

    def slow(environ, start_response):
        started.set()
        release.wait(5)  # a durable SET waiting for its commit, say
        start_response("200 OK", [("Content-Length", "2")])
        answered.set()
        return [b"ok"]

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    waitress = server.build(slow, sock, {"threads": 1})
    stopping = threading.Event()
    one_pass = waitress.main_loop.one_pass

    def pass_or_stop(timeout: float) -> None:
        if stopping.is_set():
            raise SystemExit(0)
        one_pass(timeout)

    waitress.main_loop.one_pass = pass_or_stop
    runner = threading.Thread(target=waitress.run)
    runner.start()
    with socket.create_connection(sock.getsockname(), timeout=10) as client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert started.wait(5)
        stopping.set()
        waitress.pull_trigger()  # the next pass raises SystemExit
        threading.Timer(0.5, release.set).start()
        runner.join(10)
        assert not runner.is_alive()
        assert answered.is_set(), "run() returned while the request was still running"
    for dispatcher in list(waitress._map.values()):
        dispatcher.close()


def test_a_channel_closed_by_a_task_thread_while_the_loop_asks_it_leaves_the_loop_running():
    # waitress may close a channel from its task thread (a failed send of 100
    # Continue); landing between the loop's look in the map and its change of
    # the epoll set, that made epoll_ctl fail with EBADF and ended the loop.
    with running() as (port, loop):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as doomed:
            assert ask(doomed).endswith(b"ok")
            channel = channels_by_client_port(loop)[doomed.getsockname()[1]]
            asked_once = threading.Event()

            def readable() -> bool:
                if not asked_once.is_set():
                    asked_once.set()
                    closer = threading.Thread(target=channel.handle_close)
                    closer.start()
                    closer.join()
                return True

            # Flags other than the registered ones: the loop calls epoll_ctl.
            channel.readable = readable
            channel.writable = lambda: True
            loop.mark(channel._fileno)
            waitress_trigger(loop)
            assert asked_once.wait(10)
            assert doomed.recv(1) == b""  # closed
        with socket.create_connection(("127.0.0.1", port), timeout=10) as after:
            assert ask(after, b"after").endswith(b"okafter")  # the loop still serves


def waitress_trigger(loop: MainLoop) -> None:
    """Wake the loop so that it asks the marked channels now."""
    loop.server.pull_trigger()
