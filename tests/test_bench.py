"""The benchmark harness stays runnable: its quick mode, its wrk check, its bulk loader."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys

import pytest
from conftest import ROOT

from kvapp.repository import Repository

SCENARIOS = ["ceiling", "get-hit", "get-miss", "set-unique", "set-hot", "mix"]


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)"
)
def test_quick_run_writes_a_table_with_every_scenario_on_both_servers(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (data,) = tmp_path.glob("*-quick.json")
    (markdown,) = tmp_path.glob("*-quick.md")
    rows = json.loads(data.read_text())["rows"]
    cells = [(r["server"], r["workers"], r["synchronous"], r["scenario"]) for r in rows]
    assert cells == [
        (server, 1, None if scenario == "ceiling" else "FULL", scenario)
        for server in ("waitress", "granian")
        for scenario in SCENARIOS
    ]
    ceilings = {r["server"]: r for r in rows if r["scenario"] == "ceiling"}
    for row in rows:
        assert row["connections"] == 16
        # Every answer was the expected one: 200s, and 404s for get-miss.
        assert row["errors"] == 0, row
        assert row["requests"] > 0 and row["rps"] > 0, row
        ceiling = ceilings[row["server"]]
        assert row["rps_ratio"] == pytest.approx(row["rps"] / ceiling["rps"], abs=0.001)
        assert row["p99_ms_ratio"] == pytest.approx(row["p99_ms"] / ceiling["p99_ms"], abs=0.001)
    table = markdown.read_text()
    assert "| server | workers | sync | scenario | conns | req/s | ×ceil |" in table
    for server, _, sync, scenario in cells:
        assert f"| {server} | 1 | {sync or '-'} | {scenario} | 16 |" in table
    assert "## Targets" in table
    # The same table is printed.
    assert table.strip() in result.stdout


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
    repository = Repository(str(db_path), synchronous="FULL")
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
