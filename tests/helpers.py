"""Test helpers: servers in subprocesses, curl, a hand-moved clock, committed rows.

Fixtures live in conftest.py; everything a test imports by name lives here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pgcluster import Cluster, find_bindir, free_port, running

from kvapp.store.location import is_postgres_url

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def running_cluster() -> Iterator[Cluster]:
    """Yield a started throwaway Cluster, destroyed afterwards; skip if initdb is missing."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL's initdb is not installed (apt-get install postgresql)")
    with running(Cluster(bindir)) as cluster:
        yield cluster


def stored(database: str | Path, sql: str) -> list[tuple]:
    """Return the rows of sql read through a connection of our own: what is committed.

    sql must read the same on both backends (no parameters); bytea comes back as bytes.
    """
    if is_postgres_url(str(database)):
        import psycopg

        with psycopg.connect(str(database), autocommit=True) as conn:
            return [tuple(row) for row in conn.execute(sql).fetchall()]
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def server_environ() -> dict[str, str]:
    """Return os.environ without KVAPP_* variables, for a server subprocess.

    kvapp refuses unknown KVAPP_ settings; a
    developer's own KVAPP_DATABASE or KVAPP_AUTH_TOKEN must not leak in either.
    """
    return {name: value for name, value in os.environ.items() if not name.startswith("KVAPP_")}


class Server:
    """A real `waitress-serve wsgi:app` subprocess on a free port (subclasses run others)."""

    def __init__(
        self,
        db_path: Path | str,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        log_path: Path | None = None,
        prefix: tuple[str, ...] = (),
    ) -> None:
        self.db_path = db_path
        # The server's stdout and stderr go to a file, not a pipe: with one access-log
        # line per request, a pipe nobody reads fills up (64 KiB) and blocks the server.
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="kvapp-server-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        self.log_path = log_path
        self.env = {**server_environ(), "KVAPP_DATABASE": str(db_path), **(env or {})}
        self.args = args
        self.prefix = prefix  # a command that runs the server, e.g. setpriv ... --
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        """Return the command line that serves on self.port."""
        waitress = Path(sys.executable).with_name("waitress-serve")
        return [str(waitress), "--listen", f"127.0.0.1:{self.port}", *self.args, "wsgi:app"]

    def start(self, timeout: float = 15.0) -> Server:
        self.port = free_port()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, *self.argv()],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError("server did not start listening")

    def stop(self) -> int:
        """SIGTERM and wait; return the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        finally:
            self._drain()

    def kill(self) -> None:
        """SIGKILL: no chance to flush or close anything."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=15)
        self._drain()

    def output(self) -> str:
        """Return everything the server wrote to stdout and stderr so far."""
        return self.log_path.read_bytes().decode("utf-8", "replace")

    def _drain(self) -> None:
        if self.proc is not None:
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream and not stream.closed:
                    stream.close()


class KvappServer(Server):
    """`python -m kvapp serve`: the run command, with its worker processes."""

    def argv(self) -> list[str]:
        listen = ["--host", "127.0.0.1", "--port", str(self.port)]
        return [sys.executable, "-m", "kvapp", "serve", *listen, *self.args]

    def kill(self) -> None:
        """SIGKILL the supervisor and its workers."""
        workers = child_pids(self.proc.pid) if self.proc is not None else []
        super().kill()
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class GranianServer(KvappServer):
    """`granian --interface wsgi wsgi:app`, the optional fast server."""

    def argv(self) -> list[str]:
        granian = Path(sys.executable).with_name("granian")
        listen = ["--host", "127.0.0.1", "--port", str(self.port)]
        return [str(granian), "--interface", "wsgi", *listen, *self.args, "wsgi:app"]


def child_pids(pid: int) -> list[int]:
    """Return the ids of the live (not zombie) child processes of pid, from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may hold spaces and parentheses.
        state, ppid = stat.rpartition(")")[2].split()[:2]
        if int(ppid) == pid and state != "Z":
            children.append(int(entry.name))
    return sorted(children)


def curl(*args: str, data: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """Run curl; return (status, headers with lower-case names, body)."""
    result = subprocess.run(
        ["curl", "-sS", "-i", "--max-time", "30", *args],
        input=data,
        capture_output=True,
        check=True,
    )
    raw = result.stdout
    head, _, body = raw.partition(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 100"):
        head, _, body = body.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


# The schema of the first kvapp releases (version 1): no change log, no index.
VERSION_1 = (
    "CREATE TABLE meta (name TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL)",
    "CREATE TABLE kv (key TEXT PRIMARY KEY NOT NULL, value BLOB NOT NULL,"
    " content_type TEXT NOT NULL, revision INTEGER NOT NULL, expires_at INTEGER)",
    "INSERT INTO meta (name, value) VALUES ('schema_version', 1), ('revision', 7)",
)


def copy_database(db: Path, into: Path) -> Path:
    """Copy a crashed SQLite database and its WAL into a fresh folder; return the copy's path.

    The originals stay as the crash left them, for the next round's restart.
    """
    if into.exists():
        shutil.rmtree(into)
    into.mkdir()
    for suffix in ("", "-wal"):
        source = Path(f"{db}{suffix}")
        if source.exists():
            shutil.copy2(source, into / f"{db.name}{suffix}")
    return into / db.name
