"""The data tools on a million keys: backup during writes, export, import, copy; constant memory.

It runs in CI like every test (about a minute on the 2-core machine; the
times of each step are printed, see `pytest -s`).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from bulk import fill, sample
from helpers import ROOT, server_environ
from tools import Writers, kvapp, kvapp_command, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.scale]

MILLION = 1_000_000
SMALL = 1_000
# What a run may use beyond the same run on SMALL keys: a few pages of records
# and SQLite's page cache, far below the ~300 MB that a million records held
# at once would take.
MEMORY_MARGIN_KB = 64 * 1024


def peak_rss_kb(pid: int) -> int:
    """Return VmHWM, the peak resident memory of process pid since its exec, in KiB; 0 if gone.

    (getrusage's ru_maxrss would not do: on Linux it keeps the parent's peak
    from before the child's exec, here pytest's own.)
    """
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measured(*args: str) -> tuple[int, str, int, float]:
    """Run `python -m kvapp ARGS`; return (exit status, stderr, peak RSS in KiB, seconds).

    The peak is polled every 20 ms while the run lasts, so a spike in its
    last 20 ms could be missed; the runs here last seconds.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        process = subprocess.Popen(
            kvapp_command(*args), cwd=ROOT, env=server_environ(), stdout=out, stderr=err
        )
        peak = 0
        while process.poll() is None:
            peak = max(peak, peak_rss_kb(process.pid))
            time.sleep(0.02)
        seconds = time.monotonic() - started
        err.seek(0)
        return process.returncode, err.read().decode(), peak, seconds


def differences(a: Path, b: Path) -> int:
    """Return how many rows of kv differ between two databases, in either direction."""
    conn = sqlite3.connect(f"file:{a}?mode=rw", uri=True)
    try:
        conn.execute("ATTACH ? AS other", (f"file:{b}?mode=rw",))
        return conn.execute(
            "SELECT (SELECT count(*) FROM (SELECT * FROM main.kv EXCEPT SELECT * FROM other.kv))"
            " + (SELECT count(*) FROM (SELECT * FROM other.kv EXCEPT SELECT * FROM main.kv))"
        ).fetchone()[0]
    finally:
        conn.close()


def count(path: Path) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True)
    try:
        return conn.execute("SELECT count(*) FROM kv").fetchone()[0]
    finally:
        conn.close()


def test_a_million_keys_end_to_end(server_factory, db_path, tmp_path):
    times: dict[str, float] = {}
    started = time.monotonic()
    expires_at = int(time.time() * 1000) + 24 * 3_600_000
    assert fill(db_path, sample(MILLION, expires_at=expires_at)) == MILLION
    times["bulk load"] = time.monotonic() - started
    small = tmp_path / "small.sqlite3"
    fill(small, sample(SMALL))

    # A backup while a real server takes writes: consistent, complete, not in the way.
    server = server_factory()
    backup = tmp_path / "backup.sqlite3"
    with Writers(server.port) as writers:
        wait_for(lambda: len(writers.snapshot()) >= 100)
        before = writers.snapshot()
        backup_started = time.monotonic()
        status, err, _, times["backup during writes"] = measured(
            "backup", "--database", str(db_path), str(backup)
        )
        backup_ended = time.monotonic()
    assert status == 0, err
    assert writers.failures == []
    during = [t for _, _, t in writers.snapshot() if backup_started < t < backup_ended]
    assert during, "no write was acknowledged while the backup ran"
    started = time.monotonic()
    result = kvapp("check", "--database", str(backup))
    times["check (backup)"] = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    conn = sqlite3.connect(f"file:{backup}?mode=rw", uri=True)
    try:
        stored = dict(
            conn.execute("SELECT key, value FROM kv WHERE key >= 'live-' AND key < 'live.'")
        )
    finally:
        conn.close()
    assert [key for key, value, _ in before if stored.get(key) != value] == []
    assert count(backup) == MILLION + len(stored)
    started = time.monotonic()
    result = kvapp("stats", "--json", "--database", str(backup))
    times["stats (backup)"] = time.monotonic() - started
    figures = json.loads(result.stdout)
    assert figures["keys"] == MILLION + len(stored)
    assert figures["expiring_keys"] == MILLION // 5

    # Export, import and copy of the backup: every record identical, memory flat.
    export, restored, copied = (tmp_path / name for name in ("e.jsonl", "i.sqlite3", "c.sqlite3"))
    small_export = tmp_path / "small.jsonl"
    peaks = {}
    for name, big_args, small_args in (
        (
            "export",
            ("export", "--database", str(backup), str(export)),
            ("export", "--database", str(small), str(small_export)),
        ),
        (
            "import",
            ("import", "--database", str(restored), str(export)),
            ("import", "--database", str(tmp_path / "si.sqlite3"), str(small_export)),
        ),
        (
            "copy",
            ("copy", "--from", str(backup), "--to", str(copied)),
            ("copy", "--from", str(small), "--to", str(tmp_path / "sc.sqlite3")),
        ),
    ):
        status, err, small_peak, _ = measured(*small_args)
        assert status == 0, err
        status, err, peak, times[name] = measured(*big_args)
        assert status == 0, err
        peaks[name] = (small_peak, peak)
        assert peak < small_peak + MEMORY_MARGIN_KB, (name, small_peak, peak)
    assert differences(backup, restored) == 0
    assert differences(backup, copied) == 0
    assert count(restored) == count(backup)
    print(f"\n{MILLION} keys: " + ", ".join(f"{name} {s:.1f} s" for name, s in times.items()))
    print(
        "peak RSS, 1k keys -> 1M keys: "
        + ", ".join(f"{name} {a // 1024} -> {b // 1024} MB" for name, (a, b) in peaks.items())
    )


@pytest.mark.backends("postgres")
def test_a_million_keys_copied_to_postgresql_and_back(database, pg_cluster, tmp_path):
    from helpers import stored

    times: dict[str, float] = {}
    source, back = tmp_path / "source.sqlite3", tmp_path / "back.sqlite3"
    expires_at = int(time.time() * 1000) + 24 * 3_600_000
    assert fill(source, sample(MILLION, expires_at=expires_at)) == MILLION
    small = tmp_path / "small.sqlite3"
    fill(small, sample(SMALL))
    # The baseline of memory: the same copy of a thousand keys.
    small_url = pg_cluster.create_database()
    try:
        status, err, small_peak, _ = measured("copy", "--from", str(small), "--to", small_url)
        assert status == 0, err
    finally:
        pg_cluster.release_database(small_url)
    status, err, peak, times["copy SQLite -> PostgreSQL"] = measured(
        "copy", "--from", str(source), "--to", database
    )
    assert status == 0, err
    assert peak < small_peak + MEMORY_MARGIN_KB, (small_peak, peak)
    assert stored(database, "SELECT count(*), max(revision) FROM kv") == [(MILLION, MILLION)]
    status, err, peak, times["copy PostgreSQL -> SQLite"] = measured(
        "copy", "--from", database, "--to", str(back)
    )
    assert status == 0, err
    assert peak < small_peak + MEMORY_MARGIN_KB, (small_peak, peak)
    assert differences(source, back) == 0
    assert count(back) == MILLION
    print(f"\n{MILLION} keys: " + ", ".join(f"{name} {s:.1f} s" for name, s in times.items()))
