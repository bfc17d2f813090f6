"""A throwaway PostgreSQL cluster (initdb, pg_ctl) for the tests and the benchmark.

The server runs as an unprivileged user (initdb refuses root): when we run
as root, as CI does, as the system user kvapp-test (created when missing);
otherwise as the user running us.  It listens on a free port of 127.0.0.1
and on a socket in its own temporary folder, trusts local connections, and
is removed whole at the end.  By default it does not fsync (the tests want a
cheap database each); the benchmark turns fsync back on.

Each test gets an empty database of its own.  CREATE DATABASE copies a
template of about 7 MB (some 0.2 s), so a database a test is done with is
emptied instead (its connections ended, DROP SCHEMA public CASCADE, ALTER
DATABASE RESET ALL: some 15 ms) and handed to a later test: no table, no
row, no setting of a previous test is left in it.  It needs no pytest: the
benchmark imports it too.  tests/helpers.py adds the tests' skip when
initdb is missing.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg

TEST_USER = "kvapp-test"
SUPERUSER = "kvapp"


def find_bindir() -> Path | None:
    """Return the folder of initdb and pg_ctl: the newest /usr/lib/postgresql/*/bin, or PATH."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda path: int(Path(path).parent.parent.name),
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def free_port() -> int:
    """Return a port of 127.0.0.1 that nothing listens on now (the kernel's pick).

    Under pytest-xdist each test process keeps only the ports of its own share
    (port // 2 modulo the number of processes; Linux hands bind() even ports
    first), so that two processes never start servers on one port, nor find
    the other's server when they wait for theirs to listen.
    """
    share = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:])
    processes = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if (port // 2) % processes == share:
            return port


def server_owner() -> tuple[int, int] | None:
    """Return (uid, gid) to run the server as, creating the user if need be; None: as we are."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
            check=True,
            capture_output=True,
        )
        entry = pwd.getpwnam(TEST_USER)
    return entry.pw_uid, entry.pw_gid


class Cluster:
    """One PostgreSQL server in a temporary folder."""

    def __init__(self, bindir: Path, settings: dict[str, str] | None = None) -> None:
        self.bindir = bindir
        self.owner = server_owner()
        self.folder = Path(tempfile.mkdtemp(prefix="kvapp-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        self.port = 0
        self.settings = settings or {}
        self._names = itertools.count()
        self._free: list[str] = []  # emptied databases, ready for another test
        if self.owner is not None:
            os.chown(self.folder, *self.owner)

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        prefix: list[str] = []
        if self.owner is not None:
            uid, gid = self.owner
            prefix = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
        return subprocess.run(
            [*prefix, *argv],
            cwd=self.folder,
            check=check,
            capture_output=True,
            text=True,
            env={**os.environ, "LC_ALL": "C", "TZ": "UTC"},
            timeout=120,
        )

    def init(self) -> Cluster:
        """initdb: UTF-8, locale C, trust for local connections; no fsync of the new files."""
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", SUPERUSER,
            "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        return self

    def start(self) -> Cluster:
        """Start the server on a free port (the same one again after a stop)."""
        for _ in range(5):
            port = self.port or free_port()
            conf = {
                "listen_addresses": "'127.0.0.1'",
                "port": str(port),
                "unix_socket_directories": f"'{self.folder}'",
                "max_connections": "200",
                "shared_buffers": "32MB",
                # A throwaway cluster: no fsync, so a database per test is cheap.
                # kvapp still runs with synchronous_commit = on (a test checks it);
                # a crash of the server process (pg_ctl stop -m immediate) loses
                # nothing the page cache holds, only a crash of the machine would.
                "fsync": "off",
                "full_page_writes": "off",
                **self.settings,
            }
            with open(self.data / "postgresql.auto.conf", "w") as handle:
                handle.writelines(f"{name} = {value}\n" for name, value in conf.items())
            result = self._run(
                str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                "-w", "-t", "60", "start", check=False,
            )  # fmt: skip
            if result.returncode == 0:
                self.port = port
                return self
            if self.port:  # a restart on a port that must stay the same
                break
        raise RuntimeError(f"PostgreSQL did not start: {result.stdout}{self.server_log()}")

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop: fast ends sessions cleanly; immediate is a crash (recovery at start)."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def server_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def admin(self, database: str = "postgres") -> psycopg.Connection:
        """Return a new autocommit superuser connection (the caller closes it)."""
        return psycopg.connect(self.url(database), autocommit=True)

    def create_database(self) -> str:
        """Return the URL of an empty database for one test: an emptied one, or a new one."""
        if self._free:
            return self.url(self._free.pop())
        name = f"test_{next(self._names)}"
        with self.admin() as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def release_database(self, url: str) -> None:
        """Empty the database and keep it for another test; drop it if it cannot be emptied."""
        name = url.rpartition("/")[2]
        try:
            with self.admin() as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = %s AND pid <> pg_backend_pid()",
                    (name,),
                )
                conn.execute(f"ALTER DATABASE {name} RESET ALL")
            with self.admin(name) as conn:
                conn.execute("DROP SCHEMA public CASCADE")
                conn.execute("CREATE SCHEMA public")
        except psycopg.Error:
            with self.admin() as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            return
        self._free.append(name)

    def destroy(self) -> None:
        """Stop the server (if it runs) and remove its folder."""
        if (self.data / "postmaster.pid").exists():
            self._run(
                str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w",
                "stop", check=False,
            )  # fmt: skip
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def running(cluster: Cluster) -> Iterator[Cluster]:
    """Yield cluster initialised and started; destroy it afterwards, whatever happens."""
    try:
        cluster.init().start()
        yield cluster
    finally:
        cluster.destroy()
