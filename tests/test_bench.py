"""The benchmark harness stays runnable: its quick mode, its wrk check, its bulk loader."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import urllib.request

import pytest
from helpers import ROOT
from pgcluster import find_bindir

from kvapp.store.sqlite import SQLiteStore

SCENARIOS = ["get-hit", "get-miss", "set-unique", "set-hot", "mix", "set-idle"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """Run `python -m bench --quick` once; return its rows, its markdown and its stdout."""
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (apt-get install wrk)")
    out = tmp_path_factory.mktemp("bench")
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (data,) = out.glob("*-quick.json")
    (markdown,) = out.glob("*-quick.md")
    return json.loads(data.read_text())["rows"], markdown.read_text(), result


def check_cells(rows: list[dict], table: str, backend: str, sync: str) -> None:
    """Every scenario on both servers has a cell of backend, right after its own ceiling."""
    cells = [(r["server"], r["backend"], r["synchronous"], r["scenario"]) for r in rows]
    for server in ("waitress", "granian"):
        for scenario in SCENARIOS:
            ceiling = cells.index((server, None, None, scenario))
            assert (server, backend, sync, scenario) in cells[ceiling + 1 : ceiling + 4]
            assert f"| {server} | 1 | {backend} | {sync} | {scenario} | 16 |" in table
            assert f"| {server} | 1 | ceiling | - | {scenario} | 16 |" in table
    ceilings = {
        (r["server"], r["scenario"]): r for r in rows if r["app"] == "hello"
    }  # one per server and wrk script
    assert len(ceilings) == 2 * len(SCENARIOS)
    for row in rows:
        if row["backend"] != backend:
            continue
        assert row["connections"] == 16 and row["workers"] == 1
        # Every answer was the expected one: 200s, and 404s for get-miss.
        assert row["errors"] == 0, row
        assert row["requests"] > 0 and row["rps"] > 0, row
        # The ratios are to the hello-world app driven by the cell's own wrk script.
        ceiling = ceilings[row["server"], row["scenario"]]
        assert ceiling["errors"] == 0 and ceiling["requests"] > 0, ceiling
        assert row["rps_ratio"] == pytest.approx(row["rps"] / ceiling["rps"], abs=0.001)
        assert row["p99_ms_ratio"] == pytest.approx(row["p99_ms"] / ceiling["p99_ms"], abs=0.001)
        assert ceiling["rps"] == pytest.approx(
            (ceiling["rps_before"] + ceiling["rps_after"]) / 2, abs=0.1
        )
        # What each request cost the server: some CPU, some context switches.
        for measured in (row, ceiling):
            assert measured["cpu_user_us"] + measured["cpu_system_us"] > 0, measured
            assert measured["switches"] > 0, measured
        # Writes were counted in commits (at least one write per commit); reads made none.
        if row["scenario"].startswith("set"):
            assert row["writes_per_commit"] >= 1, row
        elif row["scenario"].startswith("get"):
            assert row["writes_per_commit"] is None, row


@pytest.mark.slow
def test_quick_run_writes_a_table_with_every_scenario_on_both_servers(quick):
    rows, table, result = quick
    check_cells(rows, table, "sqlite", "FULL")
    assert "| server | workers | backend | sync | scenario | conns | req/s | ×ceil |" in table
    assert "| CPU µs/req user+sys | switches/req | writes/commit |" in table
    for server, scenario in (("waitress", "get-hit"), ("granian", "set-unique")):
        assert f"| {server} {scenario} (FULL) |" in table  # the Targets table
    assert "## Targets" in table
    # The same table is printed.
    assert table.strip() in result.stdout


@pytest.mark.slow
def test_quick_run_has_a_postgresql_column_when_postgresql_is_installed(quick):
    if find_bindir() is None:
        pytest.skip("PostgreSQL's initdb is not installed (apt-get install postgresql)")
    rows, table, result = quick
    # synchronous does not apply: PostgreSQL commits with synchronous_commit = on.
    check_cells(rows, table, "postgresql", "on")
    assert {r["synchronous"] for r in rows if r["backend"] == "postgresql"} == {"on"}
    assert "fsync on" in table and "synchronous_commit = on" in table


def bench(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_postgresql_is_measured_by_default_only_when_installed(tmp_path):
    found = bench("--dry-run", "--pg-bindir", str(tmp_path))
    assert found.returncode == 0, found.stderr
    assert "backends: sqlite, postgresql" in found.stdout.splitlines()
    assert "postgresql" not in found.stderr
    missing = bench("--dry-run", "--pg-bindir", "none")
    assert missing.returncode == 0, missing.stderr
    assert "backends: sqlite" in missing.stdout.splitlines()
    assert "apt-get install postgresql" in missing.stderr
    # Asked for explicitly, PostgreSQL must be there (wrk is checked first).
    asked = bench(
        "--quick", "--backends", "postgresql", "--pg-bindir", "none", "--out", str(tmp_path)
    )
    expected = "apt-get install postgresql" if shutil.which("wrk") else "apt-get install wrk"
    assert asked.returncode == 2 and expected in asked.stderr
    assert list(tmp_path.iterdir()) == []


def test_without_wrk_it_says_how_to_install_it(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "apt-get install wrk" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_bulk_load_stores_every_key_and_commits(db_path):
    repository = SQLiteStore(str(db_path), synchronous="FULL")
    repository.set_many([("key-3", b"old", "text/plain")])
    items = ((f"key-{i}", f"value-{i}".encode(), "text/plain") for i in range(25_000))
    assert repository.load_bulk(items, batch_size=10_000) == 25_000
    assert repository.get("key-3").value == b"value-3"  # overwritten, like /set
    assert repository.get("key-24999").value == b"value-24999"
    assert repository.get("key-25000") is None
    repository.set_many([("after", b"1", "text/plain")])
    repository.close()
    # Reopened: everything was committed, in 3 batches of one revision each.
    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT count(*) FROM kv").fetchone()[0] == 25_001
    revisions = conn.execute("SELECT DISTINCT revision FROM kv ORDER BY 1").fetchall()
    assert revisions == [(2,), (3,), (4,), (5,)]
    assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    conn.close()


def test_webdis_scripts_are_kvapps_scripts_with_webdis_urls():
    from bench import webdis, wrk

    # The same load as kvapp's cells; only the URL differs (webdis: /COMMAND/arg/arg).
    assert webdis.SCRIPTS["set-unique"] == wrk.SCRIPTS["set-unique"].replace(
        "/set?u%s-%d-%d=VALUE", "/SET/u%s-%d-%d/VALUE"
    )
    assert '"/SET/u%s-%d-%d/VALUE"' in webdis.SCRIPTS["set-unique"]
    assert '"/GET/key-%09d"' in webdis.SCRIPTS["get-hit"]
    assert all("?" not in script for script in webdis.SCRIPTS.values())


def test_the_webdis_reference_is_measured_only_when_installed(tmp_path):
    if not (shutil.which("redis-server") and shutil.which("webdis")):
        pytest.skip("redis-server or webdis is not installed (apt-get install redis-server webdis)")
    found = bench("--dry-run")
    assert "reference: webdis + Redis" in found.stdout.splitlines(), found.stdout
    assert "redis" not in found.stderr
    # PATH without redis-server and webdis (the interpreter is run by absolute path).
    env = {**os.environ, "PATH": str(tmp_path)}
    missing = subprocess.run(
        [sys.executable, "-m", "bench", "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 0, missing.stderr
    assert "reference: none" in missing.stdout.splitlines()
    assert "apt-get install redis-server webdis" in missing.stderr


def test_the_webdis_reference_serves_durable_sets_over_http(tmp_path):
    if not (shutil.which("redis-server") and shutil.which("webdis") and shutil.which("wrk")):
        pytest.skip("redis-server, webdis or wrk is not installed")
    from bench import webdis

    reference = webdis.Webdis(tmp_path / "reference")
    try:
        with socket.create_connection(("127.0.0.1", reference.redis_port)) as sock:
            sock.sendall(webdis._command(b"CONFIG", b"GET", b"appendfsync"))
            assert sock.recv(1024) == b"*2\r\n$11\r\nappendfsync\r\n$6\r\nalways\r\n"
        reference.load_keys(3)
        with urllib.request.urlopen(reference.url + "/GET/key-000000002", timeout=10) as answer:
            assert json.loads(answer.read()) == {"GET": "v" * 32}
    finally:
        reference.stop()
    assert all(proc.poll() is not None for proc in reference.procs)
    rows = webdis.measure(tmp_path / "measured", (2,), 1, 20)
    assert [(r["server"], r["scenario"], r["connections"]) for r in rows] == [
        ("webdis", "set-unique", 2),
        ("webdis", "get-hit", 2),
    ]
    for row in rows:
        assert row["errors"] == 0 and row["requests"] > 0, row
        assert row["cpu_user_us"] + row["cpu_system_us"] > 0, row
    # The SETs reached Redis' append-only file.
    aof = b"".join(path.read_bytes() for path in (tmp_path / "measured").rglob("*.aof"))
    assert b"uw2-1-1" in aof
