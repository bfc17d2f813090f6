"""Results as rows: ratios to the ceiling, the markdown table, the JSON file."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from bench import webdis

ROOT = Path(__file__).resolve().parent.parent

# The targets, at 16 connections, as (server, scenario, synchronous, goal).
TARGETS = (
    ("waitress", "get-hit", "FULL", 0.90),
    ("waitress", "set-unique", "FULL", 0.80),
    ("granian", "get-hit", "FULL", 0.60),
    ("granian", "set-unique", "FULL", 0.40),
)


def _group(row: dict) -> tuple:
    """Return what a cell shares with its ceiling: server, workers, wrk script, connections."""
    return (row["server"], row["workers"], row["scenario"], row["connections"])


def _setting(row: dict) -> tuple:
    """Return what a txn cell shares with the SET cell it is compared with: all but the script."""
    return (row["server"], row["workers"], row["backend"], row["synchronous"], row["connections"])


def add_ratios(rows: list[dict]) -> None:
    """Give each row its req/s, p50 and p99 as ratios to the ceiling row of its group.

    A txn cell also gets rps_set_ratio: its req/s over set-unique's on the same
    server, workers, backend, sync and connections (None if set-unique was not run).
    """
    ceilings = {_group(row): row for row in rows if row["app"] == "hello"}
    for row in rows:
        ceiling = ceilings.get(_group(row))
        for name in ("rps", "p50_ms", "p99_ms"):
            base = ceiling[name] if ceiling else 0
            row[f"{name}_ratio"] = round(row[name] / base, 3) if base else None
    sets = {_setting(row): row for row in rows if _is_kvapp(row, "set-unique")}
    for row in rows:
        if _is_kvapp(row, "txn"):
            found = sets.get(_setting(row))
            base = found["rps"] if found else 0
            row["rps_set_ratio"] = round(row["rps"] / base, 3) if base else None


def _is_kvapp(row: dict, scenario: str) -> bool:
    return row["app"] == "kvapp" and row["scenario"] == scenario


def method(duration: int, keys: int, value_bytes: int, backends, env: dict) -> list[str]:
    """Return the paragraphs that say how each cell and its ceiling were measured."""
    lines = [
        f"Each cell: wrk for {duration} s, 2 threads (1 at 1 connection), keep-alive,"
        f" loopback; {keys} keys loaded; SET stores {value_bytes} bytes."
        " errors: socket errors, timeouts and answers of an unexpected status"
        " (get-miss expects 404 from kvapp; the ceiling answers 200 to everything), and"
        " transactions whose answer did not say succeeded: true.",
        "",
        "The ceiling (backend `ceiling`) of each group of cells is the hello-world app"
        " (bench/hello.py: 200 and 6 bytes for any path and query) on the same server,"
        " with the same settings, worker count and connection count, driven by the same"
        " wrk script as the cells below it (get-hit, get-miss, set-unique, set-hot, mix,"
        " set-idle or txn; for txn it answers the POST after reading its body), so that wrk,"
        " which shares the cores with the servers, does the same work per request in both."
        " Its figures are the mean of a run right before and one right after kvapp's cells"
        " of that scenario and connection count, which ran between them. ×ceil: a cell's"
        " figure divided by its ceiling's (for latencies, above 1 is slower).",
        "",
        "What a request costs the server: CPU µs/req is the CPU time (user + system) of all"
        " the server's processes and threads during the cell, per request answered (wrk's"
        " own CPU is not in it); switches/req its context switches per request;"
        " writes/commit the writes that shared one commit (group commit's batch size, from"
        " kvapp's /metrics), in cells that wrote.",
    ]
    if "postgresql" in backends:
        lines += [
            "",
            f"postgresql: PostgreSQL {env.get('postgresql', '?')} in a throwaway cluster"
            " this command starts on the same machine (its processes share the cores too),"
            " with fsync on; kvapp commits with synchronous_commit = on (sync `on`), so an"
            " acknowledged write is flushed to its WAL, as with SQLite's FULL. Each kvapp"
            " server gets a fresh database, loaded with the same keys as SQLite's file.",
        ]
    return lines


def environment(pg_bindir: Path | None = None) -> dict:
    """Return what the figures depend on: machine, versions, load, commit."""

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    def command_output(*command: str) -> str:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=10, cwd=ROOT)
        except OSError:
            return "?"
        return (done.stdout or done.stderr).strip().splitlines()[0] if done.returncode < 2 else "?"

    return {
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "waitress": version("waitress"),
        "granian": version("granian"),
        "wrk": command_output("wrk", "-v").split(" [")[0],
        "postgresql": (
            # "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)" -> "15.18"
            (command_output(str(pg_bindir / "postgres"), "--version").split() + ["?"] * 3)[2]
            if pg_bindir
            else "not installed"
        ),
        "commit": command_output("git", "describe", "--always", "--dirty"),
        "reference": webdis.versions(),
        "load_average_start": os.getloadavg()[0],
    }


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def backend_label(row: dict) -> str:
    return "ceiling" if row["app"] == "hello" else row["backend"]


def matrix_table(rows: list[dict]) -> list[str]:
    lines = [
        "| server | workers | backend | sync | scenario | conns | req/s | ×ceil | p50 ms | ×ceil"
        " | p99 ms | ×ceil | CPU µs/req user+sys | switches/req | writes/commit | errors |",
        "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['server']} | {row['workers']} | {backend_label(row)}"
            f" | {row['synchronous'] or '-'} | {row['scenario']} | {row['connections']}"
            f" | {_num(row['rps'])} | {_ratio(row['rps_ratio'])} | {_num(row['p50_ms'], 2)}"
            f" | {_ratio(row['p50_ms_ratio'])} | {_num(row['p99_ms'], 2)}"
            f" | {_ratio(row['p99_ms_ratio'])} | {_cpu(row)} | {_num(row.get('switches'), 1)}"
            f" | {_num(row.get('writes_per_commit'), 2)} | {row['errors']} |"
        )
    return lines


def _cpu(row: dict) -> str:
    user, system = row.get("cpu_user_us"), row.get("cpu_system_us")
    if user is None or system is None:
        return "-"
    return f"{round(user + system):,} ({round(user):,}+{round(system):,})"


def _by_cell(rows: list[dict]) -> dict[tuple, dict]:
    """Return rows by (server, workers, backend, synchronous, scenario, connections)."""
    return {
        (r["server"], r["workers"], r["backend"], r["synchronous"], r["scenario"])
        + (r["connections"],): r
        for r in rows
    }


def targets_table(rows: list[dict]) -> list[str]:
    """Return the issue's targets: SQLite cells against the ceiling of their own scenario."""
    lines = [
        "| target (1 worker, 16 connections) | req/s | ceiling, same script: req/s"
        " (before, after) | ratio | goal | met |",
        "|---|---:|---:|---:|---:|---|",
    ]
    cells = _by_cell(rows)
    for server, scenario, synchronous, goal in TARGETS:
        row = cells.get((server, 1, "sqlite", synchronous, scenario, 16))
        ceiling = cells.get((server, 1, None, None, scenario, 16))
        if row is None or ceiling is None:
            continue
        ratio = row["rps_ratio"]
        met = "yes" if ratio is not None and ratio >= goal else "no"
        lines.append(
            f"| {server} {scenario} ({synchronous}) | {_num(row['rps'])}"
            f" | {_num(ceiling['rps'])} ({_num(ceiling.get('rps_before'))},"
            f" {_num(ceiling.get('rps_after'))}) | {_ratio(ratio)} | {goal:.2f} | {met} |"
        )
    return lines if len(lines) > 2 else []


# Many clients at once: (label, server, workers, scenario, connections, against, goal),
# against is ("connections", n): the same server's figure at n connections;
# ("ceiling",): its hello-world ceiling; ("reference", n): webdis + Redis at n.
_SET, _GET = "set-unique", "get-hit"
LOAD_TARGETS = (
    ("waitress SET, 64 vs 16 connections", "waitress", 1, _SET, 64, ("connections", 16), 0.8),
    ("waitress SET, 256 vs 16 connections", "waitress", 1, _SET, 256, ("connections", 16), 0.8),
    ("waitress GET, 256 vs 16 connections", "waitress", 1, _GET, 256, ("connections", 16), 0.8),
    ("granian 1 worker SET, 16 connections", "granian", 1, _SET, 16, ("ceiling",), 0.30),
    ("granian 2 workers SET, 64 connections", "granian", 2, _SET, 64, ("reference", 64), 0.5),
)


def load_targets_table(rows: list[dict]) -> list[str]:
    """Return the many-clients targets (durable SET is sync FULL) that this run measured."""
    lines = [
        "| target | req/s | against | its req/s | ratio | goal | met |",
        "|---|---:|---|---:|---:|---:|---|",
    ]
    cells = _by_cell(rows)
    for label, server, workers, scenario, connections, against, goal in LOAD_TARGETS:
        row = cells.get((server, workers, "sqlite", "FULL", scenario, connections))
        if against[0] == "connections":
            base = cells.get((server, workers, "sqlite", "FULL", scenario, against[1]))
            name = f"the same at {against[1]} connections"
        elif against[0] == "ceiling":
            base = cells.get((server, workers, None, None, scenario, connections))
            name = "hello-world ceiling"
        else:
            base = next(
                (r for r in rows if r["server"] == "webdis" and r["scenario"] == scenario
                 and r["connections"] == against[1]),
                None,
            )  # fmt: skip
            name = f"webdis + Redis (appendfsync always), {against[1]} connections"
        if row is None or base is None or not base["rps"]:
            continue
        ratio = row["rps"] / base["rps"]
        met = "yes" if ratio >= goal else "no"
        lines.append(
            f"| {label} | {_num(row['rps'])} | {name} | {_num(base['rps'])}"
            f" | {ratio:.2f} | {goal:.2f} | {met} |"
        )
    for row in rows:
        if row["server"] == "waitress" and row["connections"] == 256 and row["app"] == "kvapp":
            workers = f"{row['workers']} worker{'s' if row['workers'] > 1 else ''}"
            lines.append(
                f"| waitress {workers} {row['scenario']} ({row['synchronous']}), 256 connections:"
                f" errors (refused, reset, timed out, bad status); p99 {_num(row['p99_ms'], 1)} ms"
                f" | {_num(row['rps'])} | - | - | {row['errors']} errors | 0 errors"
                f" | {'yes' if row['errors'] == 0 else 'no'} |"
            )
    return lines if len(lines) > 2 else []


TXN_NOTE = (
    "txn: each request is one POST /txn with 2 conditions (exists: true on a loaded key,"
    " exists: false on the first key it puts) and 2 puts of new keys, {value} bytes each."
    " No two requests share a key, so every transaction should succeed; one that does not"
    " counts as an error. × SET: its req/s over set-unique's (a /set of one new key) on the"
    " same server, workers, backend, sync setting and connection count, in this run (both"
    " durable at sync FULL and on PostgreSQL). keys/s: the 2 keys each transaction stores."
)


def txn_table(rows: list[dict]) -> list[str]:
    """Return the txn cells: transactions per second, and against durable SET in the same run."""
    lines = [
        "| server | workers | backend | sync | conns | txn req/s | keys/s | SET req/s | × SET"
        " | p50 ms | p99 ms | writes/commit | errors |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    sets = {_setting(row): row for row in rows if _is_kvapp(row, "set-unique")}
    for row in rows:
        if not _is_kvapp(row, "txn"):
            continue
        found = sets.get(_setting(row))
        lines.append(
            f"| {row['server']} | {row['workers']} | {row['backend']}"
            f" | {row['synchronous'] or '-'} | {row['connections']} | {_num(row['rps'])}"
            f" | {_num(row['rps'] * 2)} | {_num(found['rps'] if found else None)}"
            f" | {_ratio(row.get('rps_set_ratio'))} | {_num(row['p50_ms'], 2)}"
            f" | {_num(row['p99_ms'], 2)} | {_num(row.get('writes_per_commit'), 2)}"
            f" | {row['errors']} |"
        )
    return lines if len(lines) > 2 else []


def scale_table(rows: list[dict]) -> list[str]:
    lines = [
        "| server | read cache | keys | db MiB | load s | start s | RSS MiB idle | scenario"
        " | req/s | × 1k keys | p50 ms | p99 ms | RSS MiB after | errors |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['server']} | {row.get('read_cache', 'on')} | {row['keys']:,}"
            f" | {_num(row['db_mib'])}"
            f" | {_num(row['load_seconds'], 1)} | {_num(row['start_seconds'], 2)}"
            f" | {_num(row['rss_idle_mib'], 1)} | {row['scenario']} | {_num(row['rps'])}"
            f" | {_ratio(row['rps_ratio'])} | {_num(row['p50_ms'], 2)}"
            f" | {_num(row['p99_ms'], 2)} | {_num(row['rss_after_mib'], 1)} | {row['errors']} |"
        )
    return lines


def write(out: Path, name: str, document: dict, lines: list[str]) -> tuple[Path, Path]:
    """Write name.md and name.json into out; return both paths."""
    out.mkdir(parents=True, exist_ok=True)
    markdown = out / f"{name}.md"
    markdown.write_text("\n".join(lines) + "\n")
    data = out / f"{name}.json"
    data.write_text(json.dumps(document, indent=1) + "\n")
    return markdown, data


def stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def watch_latency_table(rows: list[dict]) -> list[str]:
    """Return the watch-latency cells: from a write's 2xx to its event, at every watcher."""
    lines = [
        "| server | workers | max_watchers per worker | watchers | writes | samples | p50 ms"
        " | p99 ms | max ms | before ack | missed | PUT p50 ms | PUT p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['server']} | {row['workers']} | {row['max_watchers']} | {row['watchers']}"
            f" | {row['writes']} | {row['samples']:,} | {_num(row['p50_ms'], 2)}"
            f" | {_num(row['p99_ms'], 2)} | {_num(row['max_ms'], 2)} | {row['before_ack']:,}"
            f" | {row['missed']:,} | {_num(row['put_p50_ms'], 2)} | {_num(row['put_p99_ms'], 2)} |"
        )
    return lines


def _runs(rows: list[dict]) -> str:
    """Return the mean req/s of rows, then each row's in brackets."""
    mean = sum(row["rps"] for row in rows) / len(rows)
    return f"{_num(mean)} ({', '.join(_num(row['rps']) for row in rows)})"


def watch_load_table(rows: list[dict]) -> list[str]:
    """Return the watch-load cells: durable SET without the watchers and with them, in turn."""
    lines = [
        "| server | workers | watchers | run | req/s | p50 ms | p99 ms | CPU µs/req user+sys"
        " | writes/commit | events per watcher / due | drained in s | watchers' CPU s"
        " | errors |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        events = "-"
        if row.get("events_per_watcher") is not None:
            events = f"{row['events_per_watcher']:,} / {row['events_expected']:,}"
        lines.append(
            f"| {row['server']} | {row['workers']} | {row['watchers']} | {row['part']}"
            f" | {_num(row['rps'])} | {_num(row['p50_ms'], 2)} | {_num(row['p99_ms'], 2)}"
            f" | {_cpu(row)} | {_num(row.get('writes_per_commit'), 2)} | {events}"
            f" | {_num(row.get('drain_s'), 2)} | {_num(row.get('reader_cpu_s'), 2)}"
            f" | {row['errors']} |"
        )
    return lines


def watch_targets_table(rows: list[dict], goal: float) -> list[str]:
    """Return SET req/s with the watchers open over without: the means of each server's runs."""
    lines = [
        "| target | req/s (each run) | against | its req/s (each run) | ratio | goal | met |",
        "|---|---:|---|---:|---:|---:|---|",
    ]
    for workers in dict.fromkeys(row["workers"] for row in rows):
        cell = [row for row in rows if row["workers"] == workers]
        with_them = [row for row in cell if row["watchers"]]
        without = [row for row in cell if not row["watchers"]]
        if not with_them or with_them[0]["rps_ratio"] is None:
            continue
        ratio = with_them[0]["rps_ratio"]
        met = ratio >= goal and not any(row["errors"] for row in cell)
        plural = "s" if workers > 1 else ""
        lines.append(
            f"| waitress {workers} worker{plural}: durable SET, {with_them[0]['connections']}"
            f" connections, {with_them[0]['watchers']} watchers of"
            f" prefix={with_them[0]['prefix']} open | {_runs(with_them)}"
            f" | no watcher open | {_runs(without)} | {_ratio(ratio)}"
            f" | {goal:.2f} | {'yes' if met else 'no'} |"
        )
    return lines if len(lines) > 2 else []
