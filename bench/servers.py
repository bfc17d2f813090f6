"""The servers under test, on free ports and temporary databases, measured from /proc."""

from __future__ import annotations

import glob
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from kvapp.store.location import is_postgres_url

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ("waitress", "granian")
BACKENDS = ("sqlite", "postgresql")
VALUE = "v" * 32  # the value of every loaded key and of every SET


def load_keys(database: Path | str, count: int, first: int = 1) -> float:
    """Fill database with keys key-<first> ... key-<count>; return the seconds it took.

    database is an SQLite file (the repository's bulk loader) or a postgresql://
    URL (PostgresStore.load, the data tools' write path, in large
    transactions).
    """
    started = time.monotonic()
    items = (
        (f"key-{i:09d}", VALUE.encode(), "text/plain; charset=utf-8")
        for i in range(first, count + 1)
    )
    if is_postgres_url(str(database)):
        from kvapp.store.base import Record
        from kvapp.store.postgres import PostgresStore

        store = PostgresStore(str(database))
        try:
            records = (Record(key, value, ctype, 1, None) for key, value, ctype in items)
            while chunk := list(itertools.islice(records, 50_000)):
                store.load(chunk)
        finally:
            store.close()
        return time.monotonic() - started
    from kvapp.store.sqlite import SQLiteStore

    repository = SQLiteStore(str(database), startup_check_max_bytes=0)
    try:
        repository.load_bulk(items)
    finally:
        repository.close()
    return time.monotonic() - started


def granian_path() -> Path:
    return Path(sys.executable).with_name("granian")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Spec:
    """What to start: which server, serving kvapp or the hello-world ceiling."""

    server: str  # "waitress" or "granian"
    app: str  # "kvapp" or "hello"
    workers: int
    synchronous: str | None = None  # kvapp only
    granian_args: tuple[str, ...] = ()
    backend: str | None = None  # kvapp only: "sqlite" or "postgresql"

    def argv(self, port: int) -> list[str]:
        if self.server == "waitress":
            module = "kvapp" if self.app == "kvapp" else "bench.hello"
            command = [sys.executable, "-m", module]
            command += ["serve"] if self.app == "kvapp" else []
            return command + ["--port", str(port), "--workers", str(self.workers)]
        target = "wsgi:app" if self.app == "kvapp" else "bench.hello:app"
        return [
            str(granian_path()),
            "--interface",
            "wsgi",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(self.workers),
            *self.granian_args,
            target,
        ]


class Running:
    """A started server: its URL, its start time, its memory; stop() ends it."""

    def __init__(
        self,
        spec: Spec,
        database: Path | str | None,
        log: Path,
        timeout: float = 60,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.spec = spec
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVAPP_")}
        # kvapp settings of this server only, as KVAPP_<NAME> variables.
        env |= {f"KVAPP_{name.upper()}": value for name, value in (settings or {}).items()}
        if database is not None:
            env["KVAPP_DATABASE"] = str(database)
            if is_postgres_url(str(database)):
                # Not the default file in the system temp folder that every
                # kvapp serving this URL shares: one beside the log, per server.
                env["KVAPP_METRICS_PATH"] = str(log.with_name(f"metrics-{self.port}.sqlite3"))
        if spec.synchronous:
            env["KVAPP_SYNCHRONOUS"] = spec.synchronous
        self.log = log
        started = time.monotonic()
        with open(log, "ab") as out:
            # A session of its own, so that stop() reaches every worker.
            self.proc = subprocess.Popen(
                spec.argv(self.port),
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started

    def _wait_ready(self, timeout: float) -> None:
        """Return once GET / answers 200 (the app is loaded, not just the socket)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.spec} exited with {self.proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(self.url + "/", timeout=2) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                time.sleep(0.01)
        raise RuntimeError(f"{self.spec} did not answer within {timeout} s")

    def cpu(self) -> tuple[float, float]:
        """Return the CPU seconds (user, system) of the server's processes so far.

        A process's figures include its threads that have ended; a process
        that ended in between drops out, so compare readings of one server.
        """
        return cpu_seconds(self.pids())

    def switches(self) -> dict[int, int]:
        """Return each live thread's context switches so far, by thread id.

        Linux counts them per thread only; subtract readings thread by thread,
        over the threads alive at both (see switches_between).
        """
        counts: dict[int, int] = {}
        for pid in self.pids():
            for task in glob.glob(f"/proc/{pid}/task/*"):
                try:
                    with open(f"{task}/status") as handle:
                        status = handle.read()
                except OSError:
                    continue  # the thread ended
                counts[int(task.rsplit("/", 1)[1])] = sum(
                    int(line.split()[1]) for line in status.splitlines() if "ctxt_switches:" in line
                )
        return counts

    def commits(self) -> tuple[float, float] | None:
        """Return kvapp's (commits, writes committed) from /metrics; None for the ceiling."""
        if self.spec.app != "kvapp":
            return None
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            text = response.read().decode()
        found = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in ("kvapp_commit_batch_size_count", "kvapp_commit_batch_size_sum"):
                found[name] = float(value)
        return (
            found.get("kvapp_commit_batch_size_count", 0.0),
            found.get("kvapp_commit_batch_size_sum", 0.0),
        )

    def pids(self) -> list[int]:
        """Return the server's process and its descendants."""
        family = [self.proc.pid]
        for pid in family:
            family += _children(pid)
        return family

    def rss_mib(self) -> float:
        """Return the resident memory of all the server's processes, in MiB."""
        total_kib = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total_kib += int(line.split()[1])
            except OSError:
                pass
        return total_kib / 1024

    def stop(self) -> None:
        """SIGTERM the whole session, wait, then SIGKILL what is left."""
        if self.proc.poll() is None:
            _killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        _killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """Return the CPU seconds (user, system) of the processes pids so far; ended ones drop out."""
    user = system = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended
        user += int(fields[11])
        system += int(fields[12])
    ticks = os.sysconf("SC_CLK_TCK")
    return user / ticks, system / ticks


def switches_between(before: dict[int, int], after: dict[int, int]) -> int:
    """Return the context switches between two readings, of the threads alive at both."""
    return sum(count - before[tid] for tid, count in after.items() if tid in before)


def _killpg(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]
