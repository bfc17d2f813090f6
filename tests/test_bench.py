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

SCENARIOS = ["get-hit", "get-miss", "set-unique", "set-hot", "mix", "set-idle", "txn"]


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
        # Every answer was the expected one: 200s, 404s for get-miss, and every
        # transaction succeeded.
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
        if row["scenario"].startswith("set") or row["scenario"] == "txn":
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
    assert "## Transactions" in table
    for server in ("waitress", "granian"):  # txn against durable SET, in the same run
        txn = next(r for r in rows if r["server"] == server and r["app"] == "kvapp"
                   and r["backend"] == "sqlite" and r["scenario"] == "txn")  # fmt: skip
        assert txn["rps_set_ratio"] is not None and txn["rps_set_ratio"] > 0, txn
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


def txn_rows() -> list[dict]:
    """Return kvapp cells as run_matrix makes them: set-unique and txn, at 16 and 64."""
    rows = []
    for scenario, connections, rps in (
        ("set-unique", 16, 2000.0),
        ("txn", 16, 1500.0),
        ("set-unique", 64, 2500.0),
        ("txn", 64, 1000.0),
    ):
        rows.append(
            {
                "server": "waitress", "workers": 1, "app": "kvapp", "backend": "sqlite",
                "synchronous": "FULL", "scenario": scenario, "connections": connections,
                "rps": rps, "p50_ms": 5.0, "p99_ms": 20.0, "errors": 0, "requests": 9000,
                "writes_per_commit": 4.0,
            }
        )  # fmt: skip
    return rows


def test_txn_cells_are_compared_with_set_unique_of_the_same_run():
    from bench import report

    rows = txn_rows()
    # A txn cell at 256 connections without its SET cell: no ratio.
    rows.append({**rows[1], "connections": 256, "rps": 800.0})
    report.add_ratios(rows)
    assert [r.get("rps_set_ratio") for r in rows] == [None, 0.75, None, 0.4, None]
    table = report.txn_table(rows)
    assert table[2] == (
        "| waitress | 1 | sqlite | FULL | 16 | 1,500 | 3,000 | 2,000 | 0.75 | 5.00 | 20.00"
        " | 4.00 | 0 |"
    )
    assert table[3].startswith(
        "| waitress | 1 | sqlite | FULL | 64 | 1,000 | 2,000 | 2,500 | 0.40 |"
    )
    assert table[4].startswith("| waitress | 1 | sqlite | FULL | 256 | 800 | 1,600 | - | - |")
    assert report.txn_table(rows[:1]) == []  # no txn cell, no table


def test_the_txn_script_sends_transactions_that_succeed(client):
    import re

    from bench import wrk

    script = wrk.SCRIPTS["txn"].replace("VALUE", wrk.VALUE)
    assert 'wrk.format("POST", "/txn", headers, body)' in script
    assert '["Content-Type"] = "application/json"' in script
    # The body's format: two Lua string literals joined by .., then its arguments.
    pieces = re.search(r"local body = string.format\(\s*'(.*)'\s*\.\.\s*'(.*)',", script)
    assert pieces is not None, script
    body = "".join(pieces.groups())
    client.post("/set", {"key-000000007": "loaded"})
    for n in (1, 2):  # %09d and %s mean the same in Lua's string.format as in Python's %
        key = f"tc16-1-{n}"
        answer = client.post(
            "/txn",
            (body % (7, key, key, key)).encode(),
            headers={"Content-Type": "application/json"},
        )
        # What response() looks for, as kvapp writes it.
        assert '"succeeded": true' in answer.text, answer.text
        assert answer.json["results"] == [
            {"put": f"{key}-a", "etag": answer.json["results"][0]["etag"], "created": True},
            {"put": f"{key}-b", "etag": answer.json["results"][0]["etag"], "created": True},
        ]
    assert client.get("/get", {"key": "tc16-1-2-b"}).text == wrk.VALUE
    # Only kvapp's cells count answers without it; the hello-world ceiling answers "hello".
    assert wrk.MUST_SUCCEED == {"txn"}


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


# -- the watch cells (bench/watch.py): the stream, the figures, the tables ----------------


def chunked(*pieces: bytes) -> bytes:
    """Return pieces as the body of a chunked answer, each a chunk, then the last chunk."""
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


def watch_events() -> list[bytes]:
    """Return what a watch stream sends: the ready event, puts of two revisions, a heartbeat."""
    from kvapp.store.base import PUT, Event
    from kvapp.web.watch import HEARTBEAT, event_bytes

    ready = b'id: 7\nevent: ready\ndata: {"revision": 7}\n\n'
    first = event_bytes(Event(8, 0, "watch/a", PUT, b"v" * 32, "text/plain"))
    second = event_bytes(Event(9, 0, "watch/b", PUT, b"\xff", "application/octet-stream"))
    second += event_bytes(Event(9, 1, "watch/c\u2028", PUT, b"x", "text/plain"))
    return [ready, first, HEARTBEAT, second]


def test_dechunk_returns_the_body_however_the_answer_is_split():
    from bench.sse import Dechunk

    pieces = watch_events()
    wire = chunked(*pieces) + b"HTTP/1.1 200 OK"  # anything after the last chunk is not body
    whole = Dechunk()
    assert whole.feed(wire) == b"".join(pieces) and whole.ended
    bytewise = Dechunk()
    assert b"".join(bytewise.feed(wire[i : i + 1]) for i in range(len(wire))) == b"".join(pieces)
    assert bytewise.ended
    extension = Dechunk()  # a chunk extension (;name=value) is ignored
    assert extension.feed(b"3;x=y\r\nabc\r\n2\r\nde\r") == b"abcde" and not extension.ended


def test_sse_events_are_parsed_and_heartbeats_left_out():
    from bench.sse import sse_events

    text = b"".join(watch_events()) + b"id: 10-0\nevent: put\ndata: {"  # the next, incomplete
    events, rest = sse_events(text)
    assert [(e["id"], e["event"]) for e in events] == [
        ("7", "ready"),
        ("8-0", "put"),
        ("9-0", "put"),
        ("9-1", "put"),
    ]
    assert [json.loads(e["data"]).get("key") for e in events] == [
        None,
        "watch/a",
        "watch/b",
        "watch/c\u2028",  # sent escaped: one line
    ]
    assert rest == b"id: 10-0\nevent: put\ndata: {"
    # Several data lines make one value, joined with newlines (as EventSource does).
    assert sse_events(b"data: a\ndata:b\n\n") == ([{"data": "a\nb"}], b"")


def test_a_watcher_times_each_event_by_the_read_that_completed_it():
    from bench.sse import Stream

    wire = chunked(*watch_events())
    cut_a = wire.index(b"watch/a") + 3  # the first put arrives in three reads
    cut_b = wire.index(b"watch/b")
    recorded, counted = Stream(), Stream(record=False)
    for stream in (recorded, counted):
        stream.feed(wire[:5], 0.5)  # not even the ready event yet
        assert not stream.ready
        stream.feed(wire[5:cut_a], 1.0)
        assert stream.ready and stream.puts == 0
        stream.feed(wire[cut_a : cut_a + 2], 1.5)
        stream.feed(wire[cut_a + 2 : cut_b], 2.0)
        assert stream.puts == 1
        stream.feed(wire[cut_b:], 3.0)
        assert stream.puts == 3
    assert recorded.arrivals() == {"watch/a": 2.0, "watch/b": 3.0, "watch/c\u2028": 3.0}
    assert counted.arrivals() == {}  # counting only: under load, nothing kept


def test_event_latency_is_taken_per_write_and_watcher():
    from bench.watch import latencies, percentile

    acks = {"a": 10.0, "b": 20.0}
    arrivals = [{"a": 10.002, "b": 20.001}, {"a": 9.999}]  # the second never saw b
    samples, missed = latencies(acks, arrivals)
    assert samples == pytest.approx([2.0, 1.0, -1.0])  # ms; an event may beat the ack
    assert missed == 1
    # Nearest rank: p50 of 1..100 is 50, p99 is 99; of one sample, that sample.
    values = [float(n) for n in range(100, 0, -1)]
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (
        50.0,
        99.0,
        100.0,
    )
    assert percentile([3.5], 99) == 3.5 and percentile([], 50) is None


def test_watchers_are_spread_over_the_workers_and_load_is_compared_with_none():
    from bench.watch import load_ratio, per_worker

    # max_watchers per worker: 50 watchers over 2 workers can only open 25 and 25.
    assert (per_worker(50, 2), per_worker(5, 2), per_worker(1, 2), per_worker(50, 1)) == (
        25,
        3,
        1,
        50,
    )
    rows = [
        {"part": "none 1", "watchers": 0, "rps": 1000.0},
        {"part": "with 1", "watchers": 50, "rps": 800.0},
        {"part": "none 2", "watchers": 0, "rps": 950.0},
        {"part": "with 2", "watchers": 50, "rps": 910.0},
        {"part": "none 3", "watchers": 0, "rps": 900.0},
    ]
    assert load_ratio(rows) == 0.9  # mean(800, 910) / mean(1000, 950, 900)
    assert load_ratio(rows[:2]) is None  # one run without them is not enough
    assert load_ratio(rows[:3]) == round(800 / 975, 3)


def watch_rows() -> tuple[list[dict], list[dict]]:
    latency = {
        "scenario": "watch-latency", "server": "waitress", "workers": 2, "backend": "sqlite",
        "synchronous": "FULL", "watchers": 50, "max_watchers": 25, "writes": 200,
        "samples": 10_000, "p50_ms": 1.234, "p99_ms": 9.876, "max_ms": 12.5,
        "before_ack": 12, "missed": 0, "refused": 3, "put_p50_ms": 2.5, "put_p99_ms": 8.0,
        "load_average": 1.0,
    }  # fmt: skip
    load = []
    for part, watchers, rps in (
        ("none 1", 0, 2000.0),
        ("with 1", 50, 1650.0),
        ("none 2", 0, 1900.0),
        ("with 2", 50, 1750.0),
        ("none 3", 0, 1800.0),
    ):
        row = {
            "scenario": "watch-load", "script": "set-unique", "server": "waitress",
            "workers": 1, "app": "kvapp", "backend": "sqlite", "synchronous": "FULL",
            "connections": 16, "rps": rps, "p50_ms": 5.0, "p99_ms": 20.0, "errors": 0,
            "requests": 9000, "cpu_user_us": 300, "cpu_system_us": 100, "switches": 15.0,
            "writes_per_commit": 6.5, "load_average": 1.5, "watchers": watchers, "part": part,
            "events_per_watcher": None, "drain_s": None, "rps_ratio": None,
        }  # fmt: skip
        if watchers:
            row.update(events_per_watcher=8500, writes_committed=8500, drain_s=0.25)
            row.update(events_expected=8500, prefix="u")
            row.update(reader_cpu_s=1.25, rps_ratio=0.895)
        load.append(row)
    return [latency], load


def test_the_watch_tables_show_latency_and_the_set_ratio():
    from bench import report, watch

    latency, load = watch_rows()
    assert report.watch_latency_table(latency)[2] == (
        "| waitress | 2 | 25 | 50 | 200 | 10,000 | 1.23 | 9.88 | 12.50 | 12 | 0 | 2.50 | 8.00 |"
    )
    table = report.watch_load_table(load)
    assert table[2].startswith("| waitress | 1 | 0 | none 1 | 2,000 | 5.00 | 20.00 | 400 (300+100)")
    assert table[3].endswith("| 6.50 | 8,500 / 8,500 | 0.25 | 1.25 | 0 |")
    (target,) = report.watch_targets_table(load, watch.LOAD_GOAL)[2:]
    assert target == (
        "| waitress 1 worker: durable SET, 16 connections, 50 watchers of prefix=u open"
        " | 1,700 (1,650, 1,750) | no watcher open | 1,900 (2,000, 1,900, 1,800) | 0.90 | 0.90"
        " | no |"
    )  # 0.895 shows as 0.90 but is below the goal
    for row in load:
        row["rps_ratio"] = 0.95 if row["watchers"] else None
    assert report.watch_targets_table(load, watch.LOAD_GOAL)[2].endswith("| 0.95 | 0.90 | yes |")
    load[2]["errors"] = 1  # a run without watchers failed: its figure is no baseline
    assert report.watch_targets_table(load, watch.LOAD_GOAL)[2].endswith("| 0.95 | 0.90 | no |")
    lines = watch.report_lines(latency + load, 16, 5)
    assert lines[0] == "## Watch"
    assert "### Event latency" in lines and any("(wrk set-unique, 5 s" in ln for ln in lines)
    assert all("\n" not in line for line in lines)


def test_dry_run_lists_the_watch_cells():
    found = bench(
        "--dry-run",
        "--scenarios",
        "watch-latency,watch-load",
        "--workers",
        "1,2",
        "--watchers",
        "1,50",
        "--duration",
        "3",
    )
    assert found.returncode == 0, found.stderr
    lines = found.stdout.splitlines()
    assert "scenarios: watch-latency, watch-load" in lines
    assert (
        "watch-latency: waitress, sqlite FULL, workers 1, 2 x watchers 1, 50:"
        " 200 PUTs each, one every 50 ms on fresh connections"
    ) in lines
    assert (
        "watch-load: waitress, sqlite FULL, workers 1, 2: set-unique at 16 connections"
        " for 3 s each with 0, 50, 0, 50, 0 watchers of prefix=u"
    ) in lines
    txn = bench("--dry-run", "--scenarios", "set-unique,txn").stdout.splitlines()
    assert "scenarios: set-unique, txn" in txn
    # The whole matrix has them; --quick only when asked for; --profile has no such scenario.
    assert "watch-latency" in bench("--dry-run").stdout
    assert "watch" not in bench("--dry-run", "--quick").stdout
    refused = bench("--dry-run", "--profile", "--scenarios", "watch-load")
    assert refused.returncode == 2 and "unknown scenarios: watch-load" in refused.stderr
    other = bench("--dry-run", "--scenarios", "watch-load", "--watch-prefix", "config/")
    assert other.stdout.rstrip().endswith("0, 50, 0, 50, 0 watchers of prefix=config/")
    # Under "ux" some set-unique keys would fall and some not: no count of events is due.
    partial = bench("--dry-run", "--scenarios", "watch-load", "--watch-prefix", "ux")
    assert partial.returncode == 2 and "must be '', 'u' or not start with 'u'" in partial.stderr


@pytest.mark.parametrize(
    ("prefix", "due"), [("", 8500), ("u", 8500), ("config/", 0), ("v", 0), ("U", 0)]
)
def test_watch_load_watchers_get_every_write_or_none(prefix, due):
    from bench import watch

    assert watch.load_prefix_error(prefix) is None
    assert watch.expected_events(prefix, 8500) == due


@pytest.mark.parametrize("seconds", ["0.0003", "none"])
def test_the_commit_stand_in_answers_writes_as_kvapp_and_stores_nothing(tmp_path, seconds):
    code = (
        "import webtest, bench.standin as s\n"
        "client = webtest.TestApp(s.app)\n"
        "print(client.get('/set?a=1&b=2').text.strip())\n"
        "print(client.get('/get?key=a', status='*').status_int)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={
            **os.environ,
            "KVAPP_DATABASE": str(tmp_path / "kv.sqlite3"),
            "KVAPP_ACCESS_LOG": "false",
            "BENCH_COMMIT_SECONDS": seconds,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["stored 2 keys", "404"]
