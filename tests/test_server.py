"""How kvapp runs waitress: the channel that does not spin, connections and open files.

kvapp/server.py explains the busy loop that Channel removes; the figures
are the benchmark's (docs/performance.md), never assertions here.
"""

from __future__ import annotations

import fcntl
import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import ROOT
from tools import read_answer, serving
from waitress.channel import HTTPChannel

from kvapp import server
from kvapp.config import load_config

# No access log: serving() leaves the server's stderr pipe unread after the banner.
QUIET = {"KVAPP_ACCESS_LOG": "false"}


def channel(cls, requests=(), buffered=0, will_close=False, writing=False):
    """Return a channel of cls in a given state, without a socket."""
    made = cls.__new__(cls)
    made.requests = list(requests)
    made.total_outbufs_len = buffered
    made.will_close = will_close
    made.close_when_flushed = False
    made.task_writing = writing
    return made


def test_while_a_task_writes_a_small_answer_the_loop_does_not_wait_to_send_it():
    # waitress's own channel asks the loop to send: the loop's poll() returns at
    # once while the task thread holds the buffer's lock, which is the busy loop.
    assert channel(HTTPChannel, requests=["running"], buffered=200).writable()
    assert not channel(server.Channel, requests=["running"], buffered=200, writing=True).writable()


def test_what_the_socket_refused_is_the_loop_s_to_send_once_the_task_has_written():
    # Left for the task's next write, the end of a watch event reached a slow
    # client a heartbeat late.
    assert channel(server.Channel, requests=["running"], buffered=200).writable()


@pytest.mark.parametrize(
    "state",
    [
        {"buffered": 200},  # the task ended: the loop sends what is left
        {"requests": ["running"], "buffered": server.LOOP_FLUSH_BYTES},  # a slow reader
        {"requests": ["running"], "will_close": True},
        {"will_close": True},
    ],
)
def test_the_loop_still_sends_when_no_task_runs_or_much_is_waiting(state):
    assert channel(server.Channel, **state).writable()
    assert channel(HTTPChannel, **state).writable()


def test_nothing_to_send_is_not_writable():
    assert not channel(server.Channel).writable()
    assert not channel(server.Channel, requests=["running"]).writable()


def test_the_open_files_limit_is_raised_to_fit_the_connections():
    # In a child process: the limit is per process, and this one must keep its own.
    code = (
        "import resource; from kvapp import server\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "print(server.raise_open_files_limit(1000))\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 512))\n"
        "print(server.raise_open_files_limit(1000))\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 1000 + server.SPARE_FILES:
        pytest.fail(f"this machine's hard open-files limit {hard} is below what the test needs")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    lines = result.stdout.splitlines()
    assert lines[0] == "None" and int(lines[1]) == 1000 + server.SPARE_FILES
    assert "connection_limit = 1000 with 0 threads needs 1064 open files" in lines[2]
    assert "the limit is 512" in lines[2]
    assert "lower connection_limit" in lines[2] and int(lines[3]) == 512


def test_the_open_files_limit_counts_each_thread_s_database_files():
    # Each thread keeps its own SQLite reader: its database and -wal files.
    # Counted as spare files, 64 threads left a server out of files (EMFILE)
    # before it reached connection_limit.
    code = (
        "import resource; from kvapp import server\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))\n"
        "print(server.raise_open_files_limit(100, 16))\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    lines = result.stdout.splitlines()
    assert lines[0] == "None"
    # 100 connections, 16 threads of 2 files each (measured), the spare ones.
    assert int(lines[1]) == 100 + 16 * 2 + server.SPARE_FILES


@pytest.mark.slow
def _waitress_serve(
    tmp_path: Path, *options: str, preexec_fn: Callable[[], None] | None = None
) -> tuple[subprocess.Popen, int]:
    """Start `waitress-serve wsgi:app` on a port the kernel picks; return it and the port."""
    waitress = str(Path(sys.executable).with_name("waitress-serve"))
    env = {**os.environ, "KVAPP_DATABASE": str(tmp_path / "kv.sqlite3"), **QUIET}
    process = subprocess.Popen(
        [waitress, "--listen=127.0.0.1:0", *options, "wsgi:app"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=preexec_fn,
    )
    line = b""
    while b"Serving on http://" not in line:
        line = process.stdout.readline()
        if not line:
            process.wait(timeout=30)
            raise AssertionError(f"waitress-serve exited with status {process.returncode}")
    return process, int(line.rsplit(b":", 1)[1])


def test_waitress_serve_raises_the_open_files_limit_as_kvapp_serve_does(tmp_path):
    # docs/guarantees.md gives waitress-serve --connection-limit=2050, over
    # Debian's default soft limit of 1024 open files.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))

    process, port = _waitress_serve(
        tmp_path, "--connection-limit=100", "--threads=8", preexec_fn=low_soft_limit
    )
    try:
        # waitress says "Serving" before it runs the server: once it answers, it runs.
        assert _get(port, "/healthz").startswith(b"HTTP/1.1 200")
        limits = Path(f"/proc/{process.pid}/limits").read_text()
        soft = int(next(row for row in limits.splitlines() if "open files" in row).split()[3])
    finally:
        process.terminate()
        process.wait(timeout=30)
        process.stdout.close()
    assert soft == 100 + 8 * 2 + server.SPARE_FILES


# A child process with a server built in process, its loop not run: it runs
# out of files, then asks the listening socket as the loop would.
OUT_OF_FILES = """
import json, logging, os, resource, socket, time
from kvapp import server
records = []
handler = logging.Handler()
handler.emit = records.append
logging.getLogger("waitress").addHandler(handler)
listener = socket.create_server(("127.0.0.1", 0))
built = server.build(lambda environ, start_response: [], listener, {"threads": 1})
clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
filler = []
while True:
    try:
        filler.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        break
asked = 0
for _ in range(20):
    if built.readable():
        asked += 1
        built.handle_accept()
out = {"asked": asked, "lines": [(r.getMessage(), bool(r.exc_info)) for r in records]}
for fd in filler:
    os.close(fd)
deadline = time.monotonic() + 10
while not built.readable() and time.monotonic() < deadline:
    time.sleep(0.05)
built.handle_accept()
out["channels"] = len(built.active_channels)
out["after"] = [r.getMessage() for r in records[len(out["lines"]):]]
print(json.dumps(out), flush=True)
os._exit(0)
"""


def test_a_stop_signal_is_acted_on_where_the_loop_waits_not_in_the_middle_of_a_pass(
    monkeypatch,
):
    # A SystemExit raised between a send and the buffer's skip of it made
    # the drain send those bytes again.
    from kvapp.mainloop import Stopping

    monkeypatch.setattr(Stopping, "received", [])
    monkeypatch.setattr(Stopping, "heeded", 0)
    monkeypatch.setattr(Stopping, "looping", True)
    monkeypatch.setattr(Stopping, "waiting", False)
    Stopping.handle(signal.SIGTERM, None)  # mid-pass: noted, not raised
    with pytest.raises(SystemExit):
        Stopping.check()  # the loop's next wait
    Stopping.check()  # acted on once: the drain goes on
    monkeypatch.setattr(Stopping, "waiting", True)
    with pytest.raises(KeyboardInterrupt):
        Stopping.handle(signal.SIGINT, None)  # a second signal, while it waits: at once


def test_a_signal_that_nohup_ignores_stays_ignored(tmp_path):
    def as_nohup() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    process, port = _waitress_serve(tmp_path, preexec_fn=as_nohup)
    try:
        assert _get(port, "/healthz").startswith(b"HTTP/1.1 200")
        process.send_signal(signal.SIGHUP)
        assert _get(port, "/healthz").startswith(b"HTTP/1.1 200"), "SIGHUP stopped it"
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        process.stdout.close()


def test_a_server_out_of_files_stops_asking_to_accept_for_a_while_and_logs_once():
    # Level-triggered, the listening socket stays readable while accept()
    # fails with EMFILE: the loop spun at 100% CPU, and waitress logged a
    # traceback per attempt (212,430 lines in 5 s).
    result = subprocess.run(
        [sys.executable, "-c", OUT_OF_FILES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["asked"] == 1, f"asked to accept {out['asked']} times while out of files"
    assert len(out["lines"]) == 1 and not out["lines"][0][1], out["lines"]
    assert "cannot accept connections: Too many open files" in out["lines"][0][0]
    # Files again: the queued connection is accepted, and that is said once.
    assert out["channels"] == 1
    assert out["after"] == ["accepting connections again after 1 failed attempt"]


def test_the_default_connection_limit_holds_256_clients_and_1000_idle_ones():
    assert load_config(environ={}).connection_limit >= 1000 + 256


@pytest.mark.slow
def test_300_clients_at_once_are_all_answered(tmp_path):
    """More clients than the old default connection_limit (100), all connected at once."""
    with serving("--database", str(tmp_path / "kv.sqlite3"), env=QUIET) as (_, port):
        clients = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(300)]
        try:
            for number, sock in enumerate(clients):
                request = f"GET /set?k{number}=v{number} HTTP/1.1\r\nHost: localhost\r\n\r\n"
                sock.sendall(request.encode())
            answers = [sock.recv(65536) for sock in clients]
        finally:
            for sock in clients:
                sock.close()
        assert all(answer.startswith(b"HTTP/1.1 200 OK") for answer in answers)
        answer = _get(port, "/get?key=k299")
        assert answer.endswith(b"\r\n\r\nv299")


def _store_big(port: int, value: bytes, content_type: str = "application/octet-stream") -> None:
    """PUT value under /kv/big on its own connection."""
    put = (
        f"PUT /kv/big HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(value)}\r\n"
        f"Content-Type: {content_type}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(put + value)
        assert sock.recv(65536).startswith(b"HTTP/1.1 201")


def _small_window(port: int) -> socket.socket:
    """Return a connection whose receive buffer, and so the window it announces, is small.

    Set before connecting: set afterwards, Linux keeps the larger window
    scale and then waits about 25 ms per 1 KiB read.
    """
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    return sock


@pytest.mark.slow
def test_a_large_value_reaches_a_client_that_reads_slowly(tmp_path):
    """An answer larger than LOOP_FLUSH_BYTES, read in small sips while other clients write."""
    value = bytes(range(256)) * 4096  # 1 MiB, the largest value config.ini allows
    with serving("--database", str(tmp_path / "kv.sqlite3"), env=QUIET) as (_, port):
        _store_big(port, value)
        done = threading.Event()

        def write_meanwhile() -> None:
            number = 0
            while not done.is_set():
                _get(port, f"/set?other{number}=x")
                number += 1

        writer = threading.Thread(target=write_meanwhile)
        writer.start()
        try:
            # (A raw socket server measured the same 26 s as kvapp for this read.)
            with _small_window(port) as sock:
                sock.sendall(b"GET /kv/big HTTP/1.1\r\nHost: localhost\r\n\r\n")
                received = b""
                while b"\r\n\r\n" not in received or len(received.partition(b"\r\n\r\n")[2]) < len(
                    value
                ):
                    chunk = sock.recv(1024)
                    assert chunk, "the server closed the connection mid-answer"
                    received += chunk
        finally:
            done.set()
            writer.join()
        assert received.startswith(b"HTTP/1.1 200 OK")
        assert received.partition(b"\r\n\r\n")[2] == value


def _get(port: int, target: str) -> bytes:
    """Return the whole answer to one GET on a connection of its own."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


@pytest.mark.parametrize(
    ("argv0", "expected"),
    [
        ("/usr/local/bin/waitress-serve", "kvapp.server kvapp.server"),
        (
            "/srv/venv/lib/python3.11/site-packages/waitress/__main__.py",
            "kvapp.server kvapp.server",
        ),
        ("/usr/local/bin/granian", "waitress.channel waitress.server"),
    ],
)
def test_waitress_serve_builds_its_server_with_kvapps_channel_and_loop(tmp_path, argv0, expected):
    # wsgi.py is imported by waitress-serve before it builds its server.
    code = (
        f"import sys; sys.argv[0] = {argv0!r}\n"
        "import wsgi\n"
        "from waitress.server import BaseWSGIServer\n"
        "print(BaseWSGIServer.channel_class.__module__, BaseWSGIServer.run.__module__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "KVAPP_DATABASE": str(tmp_path / "kv.sqlite3")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[-2] == expected


@pytest.mark.slow
def test_waitress_serve_answers_300_clients_and_keeps_idle_ones(tmp_path):
    """`waitress-serve wsgi:app` with kvapp's loop: idle connections stay served."""
    process, port = _waitress_serve(tmp_path, "--connection-limit=1000")
    try:
        clients = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(300)]
        try:
            for rounds in range(2):  # the second round on connections idle since the first
                for number, sock in enumerate(clients):
                    sock.sendall(
                        f"GET /set?k{number}=r{rounds} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
                    )
                answers = [read_answer(sock) for sock in clients]
                assert all(answer.startswith(b"HTTP/1.1 200 OK") for answer in answers)
                assert all(answer.endswith(b"\r\n\r\nstored 1 key\n") for answer in answers)
        finally:
            for sock in clients:
                sock.close()
        assert _get(port, "/get?key=k299").endswith(b"\r\n\r\nr1")
    finally:
        process.terminate()
        process.wait(timeout=30)
        process.stdout.close()


TIMEOUT = 10  # channel_timeout of the in-process server below; its clock is moved by hand


@pytest.fixture
def quiet_server():
    """Yield a kvapp waitress server built in process, its loop never run, and a client maker.

    The maker returns (channel, client socket): a real TCP connection on
    127.0.0.1 whose server side is a Channel of that server.  The tests
    call the server's maintenance with a clock of their own.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    built = server.build(_no_app, listener, {"channel_timeout": TIMEOUT, "threads": 1})
    clients = []

    def connect():
        client = socket.socket()
        # Before connecting: the window the handshake announces is small too.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.settimeout(10)
        client.connect(listener.getsockname())
        clients.append(client)
        sock, addr = listener.accept()
        sock.setblocking(False)
        return server.Channel(built, sock, addr, built.adj, map=built._map), client

    try:
        yield built, connect
    finally:
        for client in clients:
            client.close()
        for channel in list(built.active_channels.values()):
            channel.handle_close()
        built.task_dispatcher.shutdown()
        built.close()
        listener.close()


def _no_app(environ, start_response):
    raise AssertionError("no request reaches these channels")


def _take(client: socket.socket, size: int) -> None:
    """Read size bytes, as a client taking a large answer does."""
    while size > 0:
        size -= len(client.recv(min(size, 65536)))


def test_a_client_reading_slowly_after_its_requests_stays_until_it_stops_taking_bytes(
    quiet_server,
):
    # The last answers of pipelined GETs wait in the channel's buffer after the
    # requests have ended.  waitress closed the channel once its last send was
    # channel_timeout old, and threw that output away, while the client read on.
    built, connect = quiet_server
    channel, client = connect()
    channel.write_soon(b"x" * (8 * 1024 * 1024))  # more than the kernel's queue takes
    channel._flush_some()
    assert channel.total_outbufs_len, "the kernel took 8 MiB at once"
    now = channel.last_activity + 3 * TIMEOUT
    built.maintenance(now)
    assert channel.connected and not channel.will_close, "cut while bytes wait for the client"
    _take(client, 256 * 1024)
    now += 3 * TIMEOUT
    built.maintenance(now)
    assert channel.connected and not channel.will_close, "cut while the client takes bytes"
    # Then it stops reading: closed once it has taken nothing for channel_timeout.
    # (A window update from the last read may still let a few bytes go: a look more.)
    for _ in range(3):
        now += TIMEOUT
        built.maintenance(now)
        if not channel.connected:
            break
    assert not channel.connected, "a client that took nothing for channel_timeout stays"


def test_a_channel_with_nothing_queued_keeps_waitresss_idle_rule(quiet_server):
    built, connect = quiet_server
    idle, _ = connect()
    drained, client = connect()
    drained.write_soon(b"x" * 100_000)
    drained._flush_some()
    _take(client, 100_000)
    now = max(idle.last_activity, drained.last_activity)
    built.maintenance(now + TIMEOUT / 2)
    assert not idle.will_close and not drained.will_close
    built.maintenance(now + TIMEOUT + 1)
    assert idle.will_close and drained.will_close


def test_a_channel_that_had_megabytes_waiting_is_idle_channel_timeout_after_its_last_send(
    quiet_server,
):
    # A pass saw bytes waiting, then the client took them all: counting the
    # idle time from the next pass kept it up to twice channel_timeout.
    built, connect = quiet_server
    channel, client = connect()
    channel.write_soon(b"x" * (8 * 1024 * 1024))
    channel._flush_some()
    built.maintenance(channel.last_activity + TIMEOUT / 2)
    assert channel.taken_mark[0], "the pass saw nothing waiting in the kernel"
    got = 0
    while got < 8 * 1024 * 1024:
        channel._flush_some()
        got += len(client.recv(65536))
    deadline = time.monotonic() + 10
    while _unacknowledged(channel) and time.monotonic() < deadline:
        time.sleep(0.01)  # the client's last ACK
    assert not channel.will_close and channel.connected
    built.maintenance(channel.last_activity + TIMEOUT + 1)
    assert channel.will_close


def _unacknowledged(channel) -> int:
    return struct.unpack("i", fcntl.ioctl(channel.socket, termios.TIOCOUTQ, b"\0" * 4))[0]


@pytest.mark.slow
def test_a_stop_sends_the_answers_still_in_the_server_s_buffers(tmp_path):
    # The loop alone sends what a client's socket refused; once SIGTERM had
    # stopped it, the answers still in the channel's buffers were lost.
    value = b"v" * (1024 * 1024)
    with serving("--database", str(tmp_path / "kv.sqlite3"), env=QUIET) as (process, port):
        _store_big(port, value)
        with _small_window(port) as sock:
            # 8 MiB of answers, more than the kernel's buffers take: the rest
            # waits in the channel's buffers.
            sock.sendall(b"GET /kv/big HTTP/1.1\r\nHost: localhost\r\n\r\n" * 8)
            received = bytearray(sock.recv(100))  # bytes += would copy megabytes per read
            assert received.startswith(b"HTTP/1.1 200")
            process.send_signal(signal.SIGTERM)
            while chunk := sock.recv(1024 * 1024):
                received += chunk
            assert process.wait(timeout=30) == 0
    assert received.count(value) == 8, f"{len(received)} bytes of 8 answers of 1 MiB"


@pytest.mark.slow
def test_a_client_that_reads_nothing_does_not_keep_a_stopping_server(tmp_path):
    # The stop sends what waits only until its deadline (server.STOP_DRAIN_S).
    # 40 answers of 1 MiB pass outbuf_high_watermark (16 MiB): the task waits
    # for the client; the drain's end closes the channel, which wakes it, so
    # waitress need not give up on its thread ("1 thread(s) still running"
    # after 5 s more, which took the stop near the supervisor's 10 s).
    with serving("--database", str(tmp_path / "kv.sqlite3"), env=QUIET) as (process, port):
        _store_big(port, b"v" * (1 << 20))
        with _small_window(port) as sock:
            sock.sendall(b"GET /kv/big HTTP/1.1\r\nHost: localhost\r\n\r\n" * 40)
            assert sock.recv(100).startswith(b"HTTP/1.1 200")
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
            assert b"still running" not in process.stderr.read()
