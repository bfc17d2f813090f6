"""The scale part (`python -m bench --scale`): the same server at 1k, 1M and 10M keys.

One database grows through the sizes (the bulk loader adds the missing keys).
At each size every server starts afresh (1 worker, synchronous=FULL, the
settings of config.ini): its start time (spawn to the first answer) and resident
memory, then GET and SET of random existing keys at 16 connections, each as a
ratio to the figure at the first (smallest) size.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import sys
import time
from pathlib import Path

from bench import report, servers, wrk
from bench.servers import Running, Spec

CONNECTIONS = 16
SCENARIOS = ("get-random", "set-random")
# Each size is measured with the read cache as shipped and without it: at 1k
# keys every GET is a cache hit, at 1M and 10M random keys almost none is, so
# only the second shows how SQLite's lookups and writes scale with the data.
READ_CACHE = {"on": {}, "off": {"read_cache_bytes": "0"}}


def run(args: argparse.Namespace, tmp: Path, env: dict, argv: list[str]):
    """Measure each size; return the JSON document and the markdown lines."""
    database = tmp / "scale.sqlite3"
    granian_args = tuple(shlex.split(args.granian_args))
    rows: list[dict] = []
    loaded = 0
    for keys in sorted(args.scale_keys):
        load_seconds = servers.load_keys(database, keys, first=loaded + 1)
        # The loader does not fsync; let the OS write its pages out now, so that
        # no cell's fsyncs compete with that writeback.
        started = time.monotonic()
        os.sync()
        print(
            f"  loaded {keys - loaded:,} keys in {load_seconds:.1f} s"
            f" ({(keys - loaded) / load_seconds:,.0f} keys/s), written out in"
            f" {time.monotonic() - started:.1f} s; {keys:,} in all",
            file=sys.stderr,
            flush=True,
        )
        added, loaded = keys - loaded, keys
        db_mib = _size_mib(database)
        for server, cache in itertools.product(args.servers, READ_CACHE):
            extra = granian_args if server == "granian" else ()
            spec = Spec(server, "kvapp", 1, "FULL", extra)
            running = Running(spec, database, tmp / "log", settings=READ_CACHE[cache])
            try:
                rss_idle = running.rss_mib()
                for scenario in SCENARIOS:
                    result = wrk.run(running.url, scenario, CONNECTIONS, args.duration, keys=keys)
                    row = {
                        "server": server,
                        "read_cache": cache,
                        "keys": keys,
                        "db_mib": round(db_mib, 1),
                        "load_seconds": round(load_seconds, 2),
                        "keys_added": added,
                        "start_seconds": round(running.start_seconds, 3),
                        "rss_idle_mib": round(rss_idle, 1),
                        "scenario": scenario,
                        "rps": round(result.rps, 1),
                        "p50_ms": round(result.p50_ms, 3),
                        "p99_ms": round(result.p99_ms, 3),
                        "errors": result.errors,
                        "rss_after_mib": round(running.rss_mib(), 1),
                    }
                    rows.append(row)
                    print(
                        f"  {server:8} cache {cache:3} {keys:>11,} keys"
                        f"  start {row['start_seconds']:.2f} s"
                        f"  RSS {rss_idle:.1f} -> {row['rss_after_mib']:.1f} MiB"
                        f"  {scenario} {row['rps']:,.0f} req/s  errors {row['errors']}",
                        file=sys.stderr,
                        flush=True,
                    )
            finally:
                running.stop()
    _add_ratios(rows)
    command = "python -m bench " + " ".join(shlex.quote(a) for a in argv)
    lines = [
        f"# kvapp benchmark (scale), {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"Machine: {env['cores']} cores, {env['platform']}; Python {env['python']},"
        f" waitress {env['waitress']}, granian {env['granian']}; commit {env['commit']}.",
        f"Load average (1 min) at the start: {env['load_average_start']:.2f}.",
        "",
        f"1 worker, synchronous=FULL, {CONNECTIONS} connections, wrk for {args.duration} s per"
        " cell; GET and SET pick any existing key at random. load s: the bulk loader's time"
        " for the keys added at that size. start s: from spawn to the first answer (the"
        " startup quick_check runs only on databases up to 256 MiB). RSS: all the server's"
        " processes, idle after start and after the load. × 1k keys: req/s as a ratio to the"
        " smallest size, with the read cache in the same state. read cache: on as shipped"
        " (read_cache_bytes 32 MiB), off with read_cache_bytes = 0; at the smallest size"
        " every GET is a cache hit, at the larger ones few are. The loaded pages are"
        " written to disk (sync) before the servers start.",
        "",
        *report.scale_table(rows),
    ]
    document = {"kind": "scale", "command": command.strip(), "environment": env, "rows": rows}
    return document, lines


def _add_ratios(rows: list[dict]) -> None:
    base: dict[tuple[str, str, str], float] = {}
    smallest = min(row["keys"] for row in rows) if rows else 0
    for row in rows:
        if row["keys"] == smallest:
            base[(row["server"], row["read_cache"], row["scenario"])] = row["rps"]
    for row in rows:
        reference = base.get((row["server"], row["read_cache"], row["scenario"]))
        row["rps_ratio"] = round(row["rps"] / reference, 3) if reference else None


def _size_mib(database: Path) -> float:
    total = 0
    for suffix in ("", "-wal", "-shm"):
        path = Path(f"{database}{suffix}")
        if path.exists():
            total += path.stat().st_size
    return total / 2**20
