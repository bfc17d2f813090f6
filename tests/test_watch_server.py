"""Watching end to end: GET /kv/?watch and Prefer: wait against real servers.

`curl -N` and raw sockets against `waitress-serve wsgi:app` and `python -m
kvapp serve` (one process, and --workers 2), two servers on one SQLite file
or one PostgreSQL database, and nginx running deploy/nginx.conf in front.
Every wait has a deadline of several seconds and nothing is timed, except
where the point is that nginx does not hold an event back: there the event
must come well before the heartbeat would.
"""

from __future__ import annotations

import http.client
import os
import select
import signal
import socket
import subprocess
import time

import pytest
from helpers import KvappServer, Server, child_pids, curl
from proxykit import NGINX, connections_to
from test_nginx import stack_factory  # noqa: F401  (the fixture: nginx in front of kvapp)
from workerkit import one_client_per_worker, owner, socket_inode, wait_for, workers_of

pytestmark = pytest.mark.slow

WAIT = 15.0  # deadline of a wait for something that must come
TEXT = "text/plain; charset=utf-8"
OCTETS = "application/octet-stream"
HEARTBEAT = ": keep-alive"


class Watch:
    """`curl -sSN -i URL` in a subprocess: its output read as it comes, with deadlines."""

    def __init__(self, url: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            ["curl", "-sS", "-N", "-i", *args, url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.data = b""

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, deadline: float) -> bool:
        """Read what curl wrote next; return False at its end; fail at deadline."""
        remaining = deadline - time.monotonic()
        ready = select.select([self.proc.stdout], [], [], max(remaining, 0))[0]
        if not ready:
            raise AssertionError(f"nothing more within the deadline; so far: {self.data!r}")
        chunk = os.read(self.proc.stdout.fileno(), 65536)
        self.data += chunk
        return bool(chunk)

    def head(self, timeout: float = WAIT) -> tuple[int, dict[str, str]]:
        """Return the status and the headers (lower-case names) once they have come."""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.data:
            if not self._read(deadline):
                raise AssertionError(f"curl ended before the headers: {self.data!r}")
        lines = self.data.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(lines[0].split()[1]), headers

    def blocks(self) -> list[str]:
        """Return the complete blocks of the stream so far (events, comments), but heartbeats."""
        body = self.data.partition(b"\r\n\r\n")[2]
        complete = body.split(b"\n\n")[:-1]
        return [block.decode("utf-8") for block in complete if block != HEARTBEAT.encode()]

    def until(self, count: int, timeout: float = WAIT) -> list[str]:
        """Return the first count blocks (heartbeats aside) once they have come."""
        deadline = time.monotonic() + timeout
        self.head(timeout)
        while len(self.blocks()) < count:
            if not self._read(deadline):
                raise AssertionError(f"the stream ended after {self.blocks()}")
        return self.blocks()[:count]

    def finish(self, timeout: float = WAIT) -> int:
        """Read to the end of curl's output; return curl's exit status."""
        deadline = time.monotonic() + timeout
        while self._read(deadline):
            pass
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=WAIT)
        self.proc.stdout.close()
        self.proc.stderr.close()


# The exact blocks of a stream (SSE: "field: value" lines; a block ends at an empty line).


def ready(revision: int) -> str:
    return f'id: {revision}\nevent: ready\ndata: {{"revision": {revision}}}'


def put(revision: int, n: int, key: str, value: str, content_type: str = TEXT) -> str:
    """A put event; value is its JSON text ("value": "...", or "value_base64": "...")."""
    return (
        f"id: {revision}-{n}\nevent: put\n"
        f'data: {{"key": "{key}", "revision": {revision}, {value},'
        f' "content_type": "{content_type}", "expires_at": null}}'
    )


def delete(revision: int, key: str) -> str:
    return (
        f"id: {revision}-0\nevent: delete\n"
        f'data: {{"key": "{key}", "revision": {revision}, "expired": false}}'
    )


def revision_of(url: str) -> int:
    """Return the store's revision now: X-Kvapp-Revision of a listing."""
    status, headers, _ = curl(f"{url}/kv/")
    assert status == 200
    return int(headers["x-kvapp-revision"])


def put_value(url: str, key: str, value: bytes, content_type: str = TEXT) -> str:
    """PUT value at key on a fresh connection; return the new ETag."""
    args = ("-X", "PUT", "-H", f"Content-Type: {content_type}", "--data-binary", "@-")
    status, headers, _ = curl(*args, f"{url}/kv/{key}", data=value)
    assert status in (201, 204)
    return headers["etag"]


def raw_get(port: int, target: str) -> tuple[socket.socket, int, bytes]:
    """Send GET target on a new connection; return it, the status and what came with the head."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    assert data.startswith(b"HTTP/1.1 "), data
    return sock, int(data.split()[1]), data


def start_long_poll(port: int, path: str, etag: str, wait: int) -> http.client.HTTPConnection:
    """Send GET path with If-None-Match: etag and Prefer: wait; return once the server read it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    conn.request("GET", path, headers={"If-None-Match": etag, "Prefer": f"wait={wait}"})
    client_port = conn.sock.getsockname()[1]
    wait_for(lambda: request_read(port, client_port), WAIT, "the server to read the long-poll")
    return conn


def request_read(server_port: int, client_port: int) -> bool:
    """Return True once the server has read everything the client sent on this connection.

    /proc/net/tcp: the server side's receive queue (rx_queue) is empty.
    """
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if (
                int(local.rpartition(":")[2], 16) == server_port
                and int(remote.rpartition(":")[2], 16) == client_port
            ):
                return int(fields[4].partition(":")[2], 16) == 0
    return False


# -- one server: what curl -N shows -----------------------------------------------


@pytest.mark.parametrize("kind", [Server, KvappServer], ids=["waitress-serve", "kvapp-serve"])
def test_curl_follows_the_changes_under_a_prefix_and_resumes(server_factory, kind):
    # waitress-serve's own 4 threads allow 2 watchers: give it config.ini's 16.
    server = server_factory(args=("--threads=16",) if kind is Server else (), kind=kind)
    url = server.url
    watch_url = f"{url}/kv/?watch&prefix=config/"
    r0 = revision_of(url)
    with Watch(watch_url) as watch:
        status, headers = watch.head()
        assert status == 200
        assert headers["content-type"] == "text/event-stream"
        assert headers["cache-control"] == "no-store"
        assert headers["x-accel-buffering"] == "no"
        assert "content-length" not in headers
        assert watch.until(1) == [ready(r0)]  # sent at once, before any change

        # A UTF-8 value with a line break (one data line all the same), a value
        # that is not UTF-8, two keys in one write, a key just outside the
        # prefix, a delete.
        etag = put_value(url, "config/greeting", "héllo\nwörld ✓".encode())
        assert etag == f'"{r0 + 1}"'
        assert put_value(url, "config/blob", b"\xff\xfe\x00\x80bin", OCTETS) == f'"{r0 + 2}"'
        assert curl(f"{url}/set?config/a=1&config/b=2")[2] == b"stored 2 keys\n"
        assert put_value(url, "configuration", b"not watched") == f'"{r0 + 4}"'
        assert curl("-X", "DELETE", f"{url}/kv/config/greeting")[0] == 204
        # The delete comes after the write outside the prefix: had that one
        # been sent, it would be among these blocks.
        blocks = watch.until(6)
        assert watch.proc.poll() is None  # the stream stays open
    greeting = put(r0 + 1, 0, "config/greeting", '"value": "héllo\\nwörld ✓"')
    blob = put(r0 + 2, 0, "config/blob", '"value_base64": "//4AgGJpbg=="', OCTETS)
    a = put(r0 + 3, 0, "config/a", '"value": "1"')
    b = put(r0 + 3, 1, "config/b", '"value": "2"')
    deleted = delete(r0 + 5, "config/greeting")
    assert blocks == [ready(r0), greeting, blob, a, b, deleted]

    # Resumed from the first event's id (as EventSource sends it), from the
    # middle of the two-key write, and with since= (all of a revision): each
    # gets exactly the later events.  A last write, then read, shows that
    # nothing came twice or out of order before it.
    resumes = [
        (watch_url, ("-H", f"Last-Event-ID: {r0 + 1}-0"), f"{r0 + 1}-0", [blob, a, b, deleted]),
        (watch_url, ("-H", f"Last-Event-ID: {r0 + 3}-0"), f"{r0 + 3}-0", [b, deleted]),
        (f"{watch_url}&since={r0 + 3}", (), f"{r0 + 3}", [deleted]),
    ]
    watches = []
    try:
        for resume_url, args, after, expected in resumes:
            watches.append(Watch(resume_url, *args))
            first = [f": resuming after {after}", *expected]
            assert watches[-1].until(len(first)) == first
        last = put(r0 + 6, 0, "config/last", '"value": "x"')
        put_value(url, "config/last", b"x")
        for watch, (_, _, after, expected) in zip(watches, resumes, strict=True):
            everything = [f": resuming after {after}", *expected, last]
            assert watch.until(len(everything)) == everything
    finally:
        for watch in watches:
            watch.close()


# -- several processes --------------------------------------------------------------


def test_every_worker_streams_every_change_once(server_factory):
    """--workers 2, one watcher each: two accepted streams are in two processes."""
    server = server_factory(
        env={"KVAPP_MAX_WATCHERS": "1"}, args=("--workers", "2"), kind=KvappServer
    )
    workers = workers_of(server, 2)
    url = server.url
    r0 = revision_of(url)
    opened: list[Watch] = []
    streams: list[Watch] = []
    try:
        deadline = time.monotonic() + 30
        while len(streams) < 2 and time.monotonic() < deadline:
            watch = Watch(f"{url}/kv/?watch&prefix=w/")
            opened.append(watch)
            status, _ = watch.head()
            if status == 200:
                streams.append(watch)
            else:
                assert status == 503  # the worker that already serves a stream
                assert watch.finish() == 0
        assert len(streams) == 2, "no connection reached the second worker"
        # Both workers serve their one watcher now: a third is refused, wherever it lands.
        assert curl(f"{url}/kv/?watch")[0] == 503
        for watch in streams:
            assert watch.until(1) == [ready(r0)]

        # Writes on connections kept to each worker (so each stream sees
        # writes of the other process), and on fresh ones.
        expected = []
        with one_client_per_worker(server.port, workers) as clients:
            first, second = (clients[pid] for pid in workers)
            assert first.request("/set?w/a=1")[0] == 200
            expected.append(put(r0 + 1, 0, "w/a", '"value": "1"'))
            assert second.request("/set?w/b=2&w/c=3")[0] == 200
            expected.append(put(r0 + 2, 0, "w/b", '"value": "2"'))
            expected.append(put(r0 + 2, 1, "w/c", '"value": "3"'))
            put_value(url, "w/d", b"\x00\xff", OCTETS)
            expected.append(put(r0 + 3, 0, "w/d", '"value_base64": "AP8="', OCTETS))
            assert first.request("/set?w/a=4&elsewhere=1")[0] == 200
            expected.append(put(r0 + 4, 0, "w/a", '"value": "4"'))
            assert curl("-X", "DELETE", f"{url}/kv/w/b")[0] == 204
            expected.append(delete(r0 + 5, "w/b"))
            assert second.request("/set?w/e=5")[0] == 200
            expected.append(put(r0 + 6, 0, "w/e", '"value": "5"'))
            for n in range(7, 11):
                assert curl(f"{url}/set?w/n={n}")[0] == 200
                expected.append(put(r0 + n, 0, "w/n", f'"value": "{n}"'))
        for watch in streams:
            assert watch.until(1 + len(expected)) == [ready(r0), *expected]
    finally:
        for watch in opened:
            watch.close()
    assert sorted(child_pids(server.proc.pid)) == workers  # no worker died meanwhile


@pytest.mark.backends("sqlite", "postgres")
def test_a_write_through_one_server_reaches_the_watchers_of_another(server_factory, backend):
    """Two servers on one database (SQLite file or PostgreSQL), on two ports."""
    writer = server_factory(kind=Server)
    watcher = server_factory(kind=KvappServer)
    assert writer.port != watcher.port
    etag = put_value(writer.url, "shared/k", b"v1")
    r0 = revision_of(watcher.url)
    assert etag == f'"{r0}"'  # the watcher's server reads the same store

    with Watch(f"{watcher.url}/kv/?watch&prefix=shared/") as watch:
        assert watch.until(1) == [ready(r0)]
        # And a long-poll on the watcher's server for the key the writer changes.
        poll = start_long_poll(watcher.port, "/kv/shared/k", etag, 30)
        try:
            put_value(writer.url, "shared/k", "v2 é".encode())
            assert curl(f"{writer.url}/set?shared/x=1&other=2")[0] == 200
            assert curl("-X", "DELETE", f"{writer.url}/kv/shared/x")[0] == 204
            assert watch.until(4) == [
                ready(r0),
                put(r0 + 1, 0, "shared/k", '"value": "v2 é"'),
                put(r0 + 2, 0, "shared/x", '"value": "1"'),
                delete(r0 + 3, "shared/x"),
            ]
            answer = poll.getresponse()
            assert (answer.status, answer.read()) == (200, "v2 é".encode())
            assert answer.getheader("ETag") == f'"{r0 + 1}"'
            assert answer.getheader("Preference-Applied") == "wait=30"
        finally:
            poll.close()


# -- nginx in front -----------------------------------------------------------------


needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed")


@needs_nginx
def test_nginx_passes_each_event_on_at_once(stack_factory):  # noqa: F811
    """X-Accel-Buffering: no: nginx sends an event on as it comes, not when its buffer fills.

    With the heartbeat at 30 s nothing else would push a buffered event out
    before then; the event must come within 5 s, while the stream is open.
    """
    stack = stack_factory({"KVAPP_WATCH_HEARTBEAT_SECONDS": "30"})
    r0 = revision_of(stack.url)
    with Watch(f"{stack.url}/kv/?watch") as watch:
        status, headers = watch.head()
        assert (status, headers["content-type"]) == (200, "text/event-stream")
        assert watch.until(1, timeout=5) == [ready(r0)]
        put_value(stack.url, "k", b"v")
        assert watch.until(2, timeout=5) == [ready(r0), put(r0 + 1, 0, "k", '"value": "v"')]
        assert watch.proc.poll() is None
    # nginx keeps its side of a stream whose client has gone (proxy_ignore_client_abort)
    # until a heartbeat fails to pass: stop kvapp, which ends it, before nginx is stopped.
    stack.kvapp.stop()


@needs_nginx
def test_through_nginx_a_client_that_goes_away_frees_its_stream(stack_factory):  # noqa: F811
    """nginx (proxy_ignore_client_abort on) keeps the stream to kvapp after its client
    closes, until it fails to pass a heartbeat on; then it closes it and kvapp ends it.
    """
    stack = stack_factory({"KVAPP_WATCH_HEARTBEAT_SECONDS": "1"})
    sock, status, _ = raw_get(stack.port, "/kv/?watch")
    sock.close()
    assert status == 200
    # kvapp writes the access line of a stream when the stream ends and frees its slot.
    ended = '"GET /kv/?watch" 200 '
    wait_for(lambda: ended in stack.kvapp.output(), WAIT, "kvapp to end the stream")


@needs_nginx
def test_a_long_poll_through_nginx_answers_the_change(stack_factory):  # noqa: F811
    stack = stack_factory()
    # Straight to kvapp: nginx opens no connection to kvapp before the long-poll.
    etag = put_value(stack.kvapp.url, "k", b"old")
    prefer = ("-H", f"If-None-Match: {etag}", "-H", "Prefer: wait=30")
    with Watch(f"{stack.url}/kv/k", *prefer) as poll:
        wait_for(
            lambda: passed_on(stack.kvapp.port), WAIT, "nginx to pass the long-poll on to kvapp"
        )
        assert poll.proc.poll() is None
        new_etag = put_value(stack.url, "k", b"new")
        assert poll.finish() == 0
        status, headers = poll.head()
    assert (status, headers["etag"], headers["preference-applied"]) == (200, new_etag, "wait=30")
    assert poll.data.partition(b"\r\n\r\n")[2] == b"new"


def passed_on(kvapp_port: int) -> bool:
    """Return True once kvapp has read a request on a connection from nginx."""
    peers = [peer for peer, state in connections_to(kvapp_port) if state == "ESTABLISHED"]
    return any(request_read(kvapp_port, peer) for peer in peers)


# -- watcher slots: a client that goes away, one too many -----------------------------


@pytest.mark.parametrize(
    ("heartbeat", "path"),
    [("2", "/kv/?watch"), ("120", "/kv/?watch&prefix=quiet/")],
    ids=["every-key", "quiet-prefix-long-heartbeat"],
)
def test_a_client_that_goes_away_frees_its_watcher_slot(server_factory, heartbeat, path):
    """Raw sockets: the stream's thread is woken by its client's close and frees its slot.

    On a prefix nobody writes, with the next heartbeat 120 s away, nothing
    but the close (kvapp.server.Channel.when_closed) can wake it in time.
    """
    server = server_factory(
        env={"KVAPP_MAX_WATCHERS": "1", "KVAPP_WATCH_HEARTBEAT_SECONDS": heartbeat},
        kind=KvappServer,
    )
    sock, status, _ = raw_get(server.port, path)
    assert status == 200
    with sock:
        assert_slot_taken(server.port, path)
    wait_for_a_free_slot(server.port, path)


def test_a_long_poll_whose_client_goes_away_frees_its_slot(server_factory):
    """A long-poll on a key nobody writes is woken by its client's close, not its heartbeat."""
    server = server_factory(
        env={"KVAPP_MAX_WATCHERS": "1", "KVAPP_WATCH_HEARTBEAT_SECONDS": "120"},
        kind=KvappServer,
    )
    etag = put_value(server.url, "quiet", b"v")
    for _ in range(5):
        conn = start_long_poll(server.port, "/kv/quiet", etag, 100)
        # The server has read the long-poll, but its thread may not hold the
        # slot yet: a probe that comes first takes it, and the long-poll gets
        # 503.  Then both let go, and the test starts again.
        probe, status, _ = raw_get(server.port, "/kv/?watch")
        probe.close()
        if status == 503:
            break
        conn.close()
        wait_for_a_free_slot(server.port, "/kv/?watch")
    else:
        raise AssertionError("the long-poll never held the slot before the probe")
    conn.close()
    wait_for_a_free_slot(server.port, "/kv/?watch")


def assert_slot_taken(port: int, path: str) -> None:
    """Assert that a watch of path is refused: max_watchers (1) is taken."""
    sock, status, _ = raw_get(port, path)
    sock.close()
    assert status == 503


def wait_for_a_free_slot(port: int, path: str) -> None:
    """Wait (30 s at most) until a watch of path is accepted again."""

    def accepted() -> bool:
        probe, status, _ = raw_get(port, path)
        probe.close()
        assert status in (200, 503)
        return status == 200

    wait_for(accepted, 30, "the slot of the closed stream to be freed")


@pytest.mark.parametrize(
    ("kind", "workers", "stop"),
    [
        (KvappServer, 1, signal.SIGTERM),
        (KvappServer, 2, signal.SIGTERM),
        # kvapp has no reload: SIGHUP stops it in order too.
        (KvappServer, 1, signal.SIGHUP),
        (KvappServer, 2, signal.SIGHUP),
        # waitress-serve stops on Ctrl-C; kvapp.server gives it SIGTERM and SIGHUP
        # (their default action ended the process at once, streams cut mid-chunk).
        (Server, 1, signal.SIGINT),
        (Server, 1, signal.SIGTERM),
        (Server, 1, signal.SIGHUP),
    ],
    ids=[
        "kvapp-serve",
        "kvapp-serve-2-workers",
        "kvapp-serve-sighup",
        "kvapp-serve-2-workers-sighup",
        "waitress-serve-sigint",
        "waitress-serve-sigterm",
        "waitress-serve-sighup",
    ],
)
def test_a_stop_signal_ends_streams_and_long_polls(server_factory, kind, workers, stop):
    # waitress-serve's own 4 threads allow 2 watchers: give it config.ini's 16.
    args = ("--workers", str(workers)) if kind is KvappServer else ("--threads=16",)
    server = server_factory(args=args, kind=kind)
    pids = workers_of(server, workers) if workers > 1 else [server.proc.pid]
    etag = put_value(server.url, "k", b"v")
    streams = [Watch(f"{server.url}/kv/?watch") for _ in range(2)]
    try:
        for watch in streams:
            assert watch.head()[0] == 200
            watch.until(1)
        with one_client_per_worker(server.port, pids) as clients:
            poll = start_long_poll(server.port, "/kv/k", etag, 60)
            try:
                # waitress takes a process's requests in order, and a stop drops
                # those not yet taken: once a request sent after the long-poll
                # to its process is answered, the long-poll is under way.
                inode = socket_inode(server.port, poll.sock.getsockname()[1])
                assert clients[owner(inode, pids)].request("/healthz")[0] == 200
                server.proc.send_signal(stop)
                assert server.proc.wait(timeout=10) == 0
                # Each ended as the server stopped: the long-poll with its 304,
                # the streams with the end of their chunked body (curl: status 0).
                answer = poll.getresponse()
                assert (answer.status, answer.read()) == (304, b"")
                assert answer.getheader("Preference-Applied") == "wait=60"
            finally:
                poll.close()
        for watch in streams:
            assert watch.finish() == 0
    finally:
        for watch in streams:
            watch.close()
    # Not left running until waitress gave up waiting for its threads (5 s).
    assert "still running" not in server.output()


@pytest.mark.parametrize("kind", [Server, KvappServer], ids=["waitress-serve", "kvapp-serve"])
def test_a_stream_whose_client_stops_reading_is_closed_after_channel_timeout(server_factory, kind):
    # As nginx's send_timeout: bytes wait for the client, and none has gone for
    # channel_timeout.  Before, such a stream kept its thread and slot for good.
    env = {"KVAPP_MAX_WATCHERS": "2", "KVAPP_CHANNEL_TIMEOUT": "2"}
    args = ("--channel-timeout=2", "--cleanup-interval=1") if kind is Server else ()
    server = server_factory(env=env, args=args, kind=kind)
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: it counts
    stalled.settimeout(WAIT)
    stalled.connect(("127.0.0.1", server.port))
    # A healthy stream, silent longer than channel_timeout (heartbeats every 15 s):
    # nothing waits for its client, so it stays open.
    with Watch(f"{server.url}/kv/?watch&prefix=other/") as healthy:
        assert healthy.head()[0] == 200
        stalled.sendall(b"GET /kv/?watch&prefix=big/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert stalled.recv(12) == b"HTTP/1.1 200"
        for n in range(12):  # 12 MiB of events: more than the kernel's buffers take
            put_value(server.url, f"big/{n}", b"x" * (1024 * 1024))
        assert_slot_taken(server.port, "/kv/?watch")
        wait_for_a_free_slot(server.port, "/kv/?watch")
        # Its client gets what the kernel had taken, then the end of the connection.
        received = 0
        while chunk := stalled.recv(1024 * 1024):
            received += len(chunk)
        assert received < 12 * 1024 * 1024
        put_value(server.url, "other/k", b"v")
        assert 'event: put\ndata: {"key": "other/k"' in healthy.until(2)[1]
    stalled.close()


def test_a_stream_whose_client_reads_slowly_is_not_closed(server_factory):
    # Its client drains the kernel's send buffer (megabytes) for longer than
    # channel_timeout while nothing more can go in: that is progress too.
    env = {"KVAPP_MAX_WATCHERS": "1", "KVAPP_CHANNEL_TIMEOUT": "2"}
    server = server_factory(env=env, kind=KvappServer)
    with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as slow:
        slow.sendall(b"GET /kv/?watch&prefix=big/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert slow.recv(12) == b"HTTP/1.1 200"
        for n in range(8):
            put_value(server.url, f"big/{n}", b"x" * (1024 * 1024))
        received, start = 0, time.monotonic()
        while time.monotonic() - start < 8:  # about 200 KB a second, for 4 x channel_timeout
            chunk = slow.recv(20_000)
            assert chunk, f"closed after {received} bytes"
            received += len(chunk)
            time.sleep(0.1)
        assert_slot_taken(server.port, "/kv/?watch")  # the stream still runs
    wait_for_a_free_slot(server.port, "/kv/?watch")


def test_an_event_reaches_a_client_that_was_slow_to_read_it_without_waiting_a_heartbeat(
    server_factory,
):
    # What the socket refused used to wait for the stream's next write: the
    # last part of the event came with the next heartbeat (60 s here).
    env = {"KVAPP_WATCH_HEARTBEAT_SECONDS": "60", "KVAPP_CHANNEL_TIMEOUT": "300"}
    server = server_factory(env=env, kind=KvappServer)
    value = b"x" * (1024 * 1024)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: it counts
        sock.settimeout(WAIT)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(b"GET /kv/?watch&prefix=big/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        data = sock.recv(65536)
        for n in range(8):  # more than the kernel's buffers take
            put_value(server.url, f"big/{n}", value)
        time.sleep(1)  # not reading yet: the socket refuses the rest
        last = b'"key": "big/7"'
        deadline = time.monotonic() + WAIT
        while last not in data or b"null}\n\n" not in data[data.find(last) :]:
            assert time.monotonic() < deadline, f"{len(data)} bytes after {WAIT} s"
            data += sock.recv(1024 * 1024)
    assert data.count(value) == 8


def test_one_watcher_over_max_watchers_gets_503(server_factory):
    server = server_factory(env={"KVAPP_MAX_WATCHERS": "2"}, kind=KvappServer)
    etag = put_value(server.url, "k", b"v")
    with Watch(f"{server.url}/kv/?watch") as one, Watch(f"{server.url}/kv/?watch&prefix=k") as two:
        assert one.head()[0] == 200 and two.head()[0] == 200
        for args in ([f"{server.url}/kv/?watch"],
                     ["-H", f"If-None-Match: {etag}", "-H", "Prefer: wait=30",
                      f"{server.url}/kv/k"]):  # fmt: skip
            status, headers, body = curl(*args)
            assert status == 503, body
            assert headers["retry-after"] == "5"
            assert headers["content-type"] == TEXT
            assert b"max_watchers" in body and b"2 watchers" in body, body
        # Other requests are served meanwhile, the same key without a wait too.
        assert curl(f"{server.url}/kv/k")[:3:2] == (200, b"v")
        assert curl("-H", f"If-None-Match: {etag}", f"{server.url}/kv/k")[0] == 304


def test_under_waitress_serve_an_automatic_max_watchers_is_half_of_its_threads(server_factory):
    # waitress-serve runs --threads (4 here, its default), not config.ini's 16: half
    # of 16 would let 8 streams take all 4 threads and starve every other request.
    server = server_factory(args=("--threads=4",))
    with Watch(f"{server.url}/kv/?watch") as one, Watch(f"{server.url}/kv/?watch") as two:
        assert one.head()[0] == 200 and two.head()[0] == 200
        status, _, body = curl(f"{server.url}/kv/?watch")
        assert status == 503 and b"2 watchers" in body, body
        assert curl(f"{server.url}/healthz")[0] == 200
