"""Shared fixtures: settings on a temporary database, the app in process, real servers.

Storage backends: a test that depends on the `database` fixture runs on an
SQLite file; a module or test marked `@pytest.mark.backends("sqlite",
"postgres")` runs once on each, the PostgreSQL runs on a fresh database of a
throwaway cluster that the session starts (tests/pgcluster.py).
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import webtest
from hypothesis import settings as hypothesis_settings
from pgcluster import running_cluster

from kvapp import create_app
from kvapp.config import load_config
from kvapp.store.location import is_postgres_url

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("sqlite", "postgres")

# .ci/run sets HYPOTHESIS_PROFILE=ci; hypothesis does not read it by itself.
# No deadline: every example commits with synchronous=FULL (an fsync), whose
# time depends on the disk, and tests make no timing assertions.
# ci is derandomized: a CI run is reproducible and writes no example database;
# dev (the default) is random and replays failures from .hypothesis/ (gitignored).
hypothesis_settings.register_profile("dev", deadline=None, max_examples=100)
hypothesis_settings.register_profile(
    "ci", deadline=None, max_examples=300, print_blob=True, derandomize=True, database=None
)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


# In CI every test must run: FORBID_SKIPS=1 (set by .ci/run) turns a skip
# into a failure, so a missing nginx or PostgreSQL cannot pass silently.
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("FORBID_SKIPS") and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped, but FORBID_SKIPS is set: {report.longrepr}"


def pytest_generate_tests(metafunc):
    """Run a test that uses `backend` once per backend its backends marker names."""
    marker = metafunc.definition.get_closest_marker("backends")
    if marker is not None and "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", marker.args or BACKENDS, indirect=True)


@pytest.fixture
def backend(request) -> str:
    """The storage backend of this test: sqlite unless a backends marker says otherwise."""
    return getattr(request, "param", "sqlite")


@pytest.fixture(scope="session")
def pg_cluster():
    """A PostgreSQL server for the whole session, started on first use; removed at the end."""
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "kv.sqlite3"


@pytest.fixture
def database(backend: str, db_path: Path, request) -> str:
    """The database setting of this test: db_path, or the URL of a fresh PostgreSQL database."""
    if backend == "sqlite":
        yield str(db_path)
        return
    cluster = request.getfixturevalue("pg_cluster")
    url = cluster.create_database()
    yield url
    cluster.release_database(url)


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


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_settings(database: str, tmp_path: Path):
    """Return a function building Settings on this test's database, with overrides.

    With PostgreSQL the metrics file goes in tmp_path, so no two tests share one.
    """

    def make(**overrides):
        if is_postgres_url(database):
            overrides.setdefault("metrics_path", str(tmp_path / "metrics.sqlite3"))
        return load_config(ROOT / "config.ini", environ={}, database=database, **overrides)

    return make


@pytest.fixture
def settings(make_settings):
    return make_settings()


@pytest.fixture
def app(settings):
    application = create_app(settings)
    yield application
    application.close()


@pytest.fixture
def client(app) -> webtest.TestApp:
    return webtest.TestApp(app)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


@pytest.fixture
def server_factory(database: str, tmp_path: Path):
    """Return a function that starts Servers (or a subclass) on this test's database.

    All are killed at teardown.  With PostgreSQL their metrics file goes in
    tmp_path, so no two tests share one.
    """
    servers: list[Server] = []

    def start(
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        path: Path | str | None = None,
        prefix: tuple[str, ...] = (),
        kind: type[Server] = Server,
    ) -> Server:
        log_path = tmp_path / f"server-{len(servers)}.log"
        db = path or database
        if is_postgres_url(str(db)):
            env = {"KVAPP_METRICS_PATH": str(tmp_path / "metrics.sqlite3"), **(env or {})}
        server = kind(db, env, args, log_path, prefix).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()


@pytest.fixture
def server(server_factory) -> Server:
    return server_factory()


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
