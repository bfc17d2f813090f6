"""Helpers for the data tools' tests: run `python -m kvapp`, read a database's rows."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from helpers import ROOT, server_environ

from kvapp import server

Row = tuple[str, bytes, str, int, int | None]


def kvapp_command(*args: str, config: Path | None = ROOT / "config.ini") -> list[str]:
    """Return the command line of `python -m kvapp [--config config] ARGS`."""
    return [sys.executable, "-m", "kvapp", *(("--config", str(config)) if config else ()), *args]


def kvapp_environ(cwd: Path = ROOT, env: dict[str, str] | None = None) -> dict[str, str]:
    """Return the environment of a `python -m kvapp` run in cwd: this checkout's kvapp, plus env."""
    # python -m finds kvapp in the working directory; from any other folder, through PYTHONPATH.
    found = {} if cwd == ROOT else {"PYTHONPATH": str(ROOT)}
    return {**server_environ(), **found, **(env or {})}


def kvapp(
    *args: str,
    input: bytes | None = None,
    timeout: float = 300,
    config: Path | None = ROOT / "config.ini",
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run `python -m kvapp ARGS` in cwd, as a user would; return the finished run."""
    return subprocess.run(
        kvapp_command(*args, config=config),
        cwd=cwd,
        env=kvapp_environ(cwd, env),
        input=input,
        capture_output=True,
        timeout=timeout,
    )


def start_kvapp(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(kvapp_command(*args), cwd=ROOT, env=server_environ(), **popen)


BANNER = re.compile(r"kvapp: serving .* on http://(\S+):(\d+) with \d+ workers?$")


@contextlib.contextmanager
def serving(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None, timeout: float = 30
) -> Iterator[tuple[subprocess.Popen, int]]:
    """Run `python -m kvapp serve --port 0 ARGS`; yield it and the port its banner names.

    The kernel picks the port, so no other test can take it first.  Inside the
    block, process.stderr reads what the server writes after the banner; the
    server is stopped with SIGTERM afterwards.
    """
    process = subprocess.Popen(
        kvapp_command("serve", "--port", "0", *args),
        cwd=cwd,
        env=kvapp_environ(cwd, env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        timer = threading.Timer(timeout, process.kill)  # a server that never says where it is
        timer.start()
        try:
            line = process.stderr.readline().decode()
        finally:
            timer.cancel()
        found = BANNER.match(line.strip())
        assert found, f"no banner: {line!r} (exit status {process.poll()})"
        yield process, int(found[2])
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        finally:
            process.stderr.close()


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """Return the failed run's stderr, after checking it is one line and no traceback."""
    err = result.stderr.decode()
    assert result.returncode != 0, result
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def rows(path: Path) -> list[Row]:
    """Return every row of the kv table, in key order, straight from the file."""
    conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True)  # rw: leaves no -wal behind
    try:
        return conn.execute(
            "SELECT key, value, content_type, revision, expires_at FROM kv ORDER BY key"
        ).fetchall()
    finally:
        conn.close()


def meta_revision(path: Path) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True)  # rw: leaves no -wal behind
    try:
        return conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0]
    finally:
        conn.close()


def wait_for(condition, timeout: float = 60.0, interval: float = 0.005):
    """Return condition()'s first true value, polling; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {condition}")


def open_files_in(pid: int, folder: Path) -> list[int]:
    """Return the sizes of the files under folder that process pid has open (deleted ones too)."""
    sizes = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith(f"{folder}/"):
                sizes.append(os.stat(f"/proc/{pid}/fd/{fd}").st_size)
        except OSError:
            pass  # closed meanwhile
    return sizes


class Writers:
    """Threads that PUT new keys to a server until stopped, remembering each acknowledged one.

    acknowledged holds (key, value, monotonic time of the 2xx answer) in order.
    """

    def __init__(self, port: int, threads: int = 3, prefix: str = "live") -> None:
        self.port = port
        self.prefix = prefix
        self.acknowledged: list[tuple[str, bytes, float]] = []
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)
        ]

    def __enter__(self) -> Writers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def snapshot(self) -> list[tuple[str, bytes, float]]:
        with self._lock:
            return list(self.acknowledged)

    def _run(self, number: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        i = 0
        try:
            while not self._stop.is_set() and i < 1_000_000:
                key = f"{self.prefix}-{number}-{i:07d}"
                value = f"{key}\x00\xff".encode("latin-1")
                conn.request("PUT", f"/kv/{key}", body=value)
                response = conn.getresponse()
                response.read()
                if response.status not in (201, 204):
                    with self._lock:
                        self.failures.append(f"{key}: {response.status}")
                    return
                with self._lock:
                    self.acknowledged.append((key, value, time.monotonic()))
                i += 1
        finally:
            conn.close()


@contextlib.contextmanager
def in_process_server(
    app, channel=None, pass_seconds: float = 60, **adjustments
) -> Iterator[tuple[int, Any]]:
    """Serve app with kvapp's waitress server on 127.0.0.1:<kernel's choice>, in this process.

    Its loop passes in a thread of its own, with a long wait per pass: a
    change the loop did not hear of would stall the clients until their
    socket timeout, and fail them.  Yield the port and the waitress server.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    waitress = server.build(app, sock, adjustments, channel=channel or server.Channel)
    stop = threading.Event()

    def passes() -> None:
        while not stop.is_set():
            waitress.main_loop.one_pass(pass_seconds)

    thread = threading.Thread(target=passes)
    thread.start()
    try:
        yield sock.getsockname()[1], waitress
    finally:
        stop.set()
        waitress.pull_trigger()
        thread.join()
        waitress.task_dispatcher.shutdown()
        for dispatcher in list(waitress._map.values()):
            dispatcher.close()


def read_answer(sock: socket.socket) -> bytes:
    """Read one answer with a Content-Length from a keep-alive connection; return it whole."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:"))[15:]
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed mid-body"
        body += chunk
    return head + b"\r\n\r\n" + body
