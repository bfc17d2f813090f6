"""The outside reference: webdis in front of Redis with `appendfsync always`, measured in the run.

Redis with `appendonly yes` and `appendfsync always` writes and fsyncs its
append-only file before it answers a write (https://redis.io/docs/latest/operate/oss_and_stack/management/persistence/),
so a SET it acknowledged survives a power cut, as kvapp's does.  webdis
(https://webd.is) turns `GET /SET/key/value` into that command, so curl and
wrk drive both services alike.  Both run on free ports with a throwaway
folder, on the same machine and in the same run as kvapp's cells.
Debian: apt-get install redis-server webdis.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from bench import servers, wrk

# webdis' own worker threads; 2 cores here.
WEBDIS_THREADS = 2

# The wrk scripts of the two scenarios measured, in webdis' URL form.
SCRIPTS = {
    "set-unique": wrk.SCRIPTS["set-unique"].replace(
        '"/set?u%s-%d-%d=VALUE"', '"/SET/u%s-%d-%d/VALUE"'
    ),
    "get-hit": wrk.SCRIPTS["get-hit"].replace('"/get?key=key-%09d"', '"/GET/key-%09d"'),
}
SCENARIOS = tuple(SCRIPTS)


def installed() -> bool:
    return shutil.which("redis-server") is not None and shutil.which("webdis") is not None


def versions() -> str:
    """Return "Redis x.y.z" of the redis-server installed, or "not installed"."""
    if not installed():
        return "not installed"
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    # "Redis server v=7.0.15 sha=..." -> "7.0.15"
    version = next((part[2:] for part in out.split() if part.startswith("v=")), "?")
    return f"Redis {version}"


class Webdis:
    """redis-server (appendfsync always) and webdis in front of it, in folder; stop() ends both."""

    def __init__(self, folder: Path, timeout: float = 20) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.redis_port = servers.free_port()
        self.port = servers.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log = open(folder / "reference.log", "ab")
        redis = [
            "redis-server",
            "--port", str(self.redis_port),
            "--bind", "127.0.0.1",
            "--dir", str(folder),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
        ]  # fmt: skip
        with log:  # the children keep their own copies of it
            self.procs = [subprocess.Popen(redis, stdout=log, stderr=subprocess.STDOUT)]
            self._start_webdis(folder, log, timeout)

    def _start_webdis(self, folder: Path, log, timeout: float) -> None:
        config = folder / "webdis.json"
        config.write_text(
            json.dumps(
                {
                    "redis_host": "127.0.0.1",
                    "redis_port": self.redis_port,
                    "http_host": "127.0.0.1",
                    "http_port": self.port,
                    "threads": WEBDIS_THREADS,
                    "daemonize": False,
                    "database": 0,
                    "verbosity": 0,
                    "logfile": str(folder / "webdis.log"),
                }
            )
        )
        try:
            self._wait(self.redis_port, timeout)
            self.procs.append(subprocess.Popen(["webdis", str(config)], stdout=log, stderr=log))
            self._wait(self.port, timeout)
        except BaseException:
            self.stop()
            raise

    def _wait(self, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(proc.poll() is not None for proc in self.procs):
                raise RuntimeError("redis-server or webdis exited; see reference.log")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nothing listened on port {port} within {timeout} s")

    def load_keys(self, count: int) -> None:
        """SET key-000000001 ... key-<count> to the bench's value, pipelined over RESP."""
        with socket.create_connection(("127.0.0.1", self.redis_port)) as sock:
            value = servers.VALUE.encode()
            for first in range(1, count + 1, 1000):
                last = min(first + 999, count)
                chunk = b"".join(
                    _command(b"SET", f"key-{i:09d}".encode(), value) for i in range(first, last + 1)
                )
                sock.sendall(chunk)
                expected = b"+OK\r\n" * (last - first + 1)
                received = b""
                while len(received) < len(expected):
                    data = sock.recv(65536)
                    if not data:
                        raise RuntimeError("redis-server closed the connection while loading")
                    received += data
                if received != expected:
                    raise RuntimeError(f"redis-server refused a SET: {received[:200]!r}")

    def cpu(self) -> tuple[float, float]:
        """Return the CPU seconds (user, system) of redis-server and webdis so far."""
        return servers.cpu_seconds([proc.pid for proc in self.procs])

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _command(*parts: bytes) -> bytes:
    """Return one command in RESP, https://redis.io/docs/latest/develop/reference/protocol-spec/."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


def measure(folder: Path, connections: tuple[int, ...], duration: int, keys: int) -> list[dict]:
    """Return one row per scenario and connection count for webdis + Redis."""
    reference = Webdis(folder)
    rows = []
    try:
        reference.load_keys(keys)
        for count, scenario in [(c, s) for c in connections for s in SCENARIOS]:
            before = reference.cpu()
            result = wrk.run_script(
                reference.url, SCRIPTS[scenario], count, duration, keys, f"w{count}"
            )
            after = reference.cpu()
            requests = max(result.requests, 1)
            rows.append(
                {
                    "server": "webdis",
                    "workers": WEBDIS_THREADS,
                    "app": "reference",
                    "backend": "redis",
                    "synchronous": "always",
                    "scenario": scenario,
                    "connections": count,
                    "rps": round(result.rps, 1),
                    "p50_ms": round(result.p50_ms, 3),
                    "p99_ms": round(result.p99_ms, 3),
                    "errors": result.errors,
                    "requests": result.requests,
                    "cpu_user_us": round((after[0] - before[0]) / requests * 1e6),
                    "cpu_system_us": round((after[1] - before[1]) / requests * 1e6),
                    "switches": None,
                    "load_average": round(os.getloadavg()[0], 2),
                    "writes_per_commit": None,
                }
            )
    finally:
        reference.stop()
    return rows
