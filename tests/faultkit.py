"""Helpers for the fault tests: an HTTP client, databases to damage, root-only tools."""

from __future__ import annotations

import http.client
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import server_environ

from kvapp.store.sqlite import SQLiteStore

ROOT = Path(__file__).resolve().parent.parent

IS_ROOT = os.geteuid() == 0

# Mounting a tmpfs or a read-only bind mount and dropping capabilities need
# root.  CI runs as root with FORBID_SKIPS=1, so these never skip there.
needs_root = pytest.mark.skipif(
    not IS_ROOT, reason="needs root to mount filesystems and drop capabilities (CI runs as root)"
)

# Root ignores file modes because it holds CAP_DAC_OVERRIDE and
# CAP_DAC_READ_SEARCH.  Without them from the bounding set, a process of uid 0
# obeys modes like any user (capabilities(7)); unlike switching to `nobody` it
# can still read a checkout and interpreter under /root.
NO_DAC = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--")


def require_tool(name: str) -> str:
    """Return the tool's path; skip (a failure in CI) if it is not installed."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (.ci/run installs it)")
    return path


class Client:
    """One keep-alive HTTP connection to a server; every call returns (status, headers, body)."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.port = port
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(
        self, method: str, target: str, body: bytes | None = None, headers: dict | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                self.conn.request(method, target, body=body, headers=headers or {})
                response = self.conn.getresponse()
                data = response.read()
            except (ConnectionError, http.client.BadStatusLine):
                # The server closed an idle keep-alive connection: reconnect once.
                self.close()
                if attempt == 2:
                    raise
                continue
            if response.getheader("Connection", "").lower() == "close":
                self.close()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, data
        raise AssertionError("unreachable")

    def get(self, target: str) -> tuple[int, dict[str, str], bytes]:
        return self.request("GET", target)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def build_database(path: Path, count: int = 300) -> dict[str, bytes]:
    """Create a kvapp database holding count keys; close it cleanly (no -wal left)."""
    items = {f"key{i:04d}": f"value-{i}-".encode() * 20 for i in range(count)}
    repository = SQLiteStore(str(path))
    try:
        repository.set_many(
            [(key, value, "text/plain; charset=utf-8") for key, value in items.items()]
        )
    finally:
        repository.close()
    assert not Path(f"{path}-wal").exists()
    return items


def pages_of(path: Path, name: str, pagetype: str | None = None) -> list[int]:
    """Return the page numbers of a table or index (SQLite's dbstat virtual table)."""
    conn = sqlite3.connect(path)
    try:
        sql = "SELECT pageno FROM dbstat WHERE name = ?"
        args: tuple = (name,)
        if pagetype:
            sql += " AND pagetype = ?"
            args += (pagetype,)
        return [row[0] for row in conn.execute(sql + " ORDER BY pageno", args)]
    finally:
        conn.close()


def overwrite(path: Path, offset: int, data: bytes) -> None:
    """Write data into the file in place (same inode, as a disk fault would)."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def run_entry_point(command: str, db: Path, port: int, prefix: tuple[str, ...] = ()):
    """Run `waitress-serve wsgi:app` or `python -m kvapp serve` on db; return the process.

    Either must refuse to start here, so a server that keeps running is
    killed after 20 s and reported as such.
    """
    bindir = Path(sys.executable).parent
    if command == "waitress-serve":
        argv = [str(bindir / "waitress-serve"), "--listen", f"127.0.0.1:{port}", "wsgi:app"]
    else:
        argv = [sys.executable, "-m", "kvapp", "serve", "--port", str(port)]
    env = {**server_environ(), "KVAPP_DATABASE": str(db)}
    try:
        return subprocess.run(
            [*prefix, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{command} started serving on a database it should refuse")
