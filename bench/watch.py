"""The watch cells: how soon a durable write reaches its watchers, and what watchers cost writes.

watch-latency: one writer PUTs new keys one at a time, a fresh connection per
write, one every 50 ms, while n watchers follow `GET /kv/?watch&prefix=...`,
each on its own socket, all read by one thread of the bench that takes the
time of every read (the events are parsed after the cell).  A sample is, for
one write and one watcher, the time from the writer receiving the 2xx of its
PUT to that watcher receiving the write's event (matched by key).  The server
wakes its watchers right after the commit, while it answers the PUT, so an
event can arrive before the acknowledgement: such samples are negative
("before ack").  With several workers, each worker's max_watchers is n /
workers (rounded up), so n open streams are spread evenly over the
processes; each write lands on either worker, and the other worker's
watchers learn of it from the shared -gen file's commit counter, which they
poll every 10 ms while they wait.

watch-load: wrk's set-unique at 16 connections against one server, five runs
in turn: with no watcher open, with n watchers of `prefix=u` (every set-unique
key starts with u, so all n streams receive every write: the harder case;
--watch-prefix names another, such as config/, under which no key falls: what
watchers of other keys cost), with none, with n, with none; the ratio is the
mean req/s of the two runs with watchers over the mean of the three without.
One server's req/s drifts by up to 20% between runs minutes apart, so the runs
alternate and both kinds are spread over the whole cell. The watchers read all
the time (one thread, counting events) and must each receive one event per
write committed during their run.

Both run `python -m kvapp serve` (waitress) on SQLite with synchronous=FULL,
with threads = config.ini's threads + max_watchers per worker, so that the
watchers (each holds a server thread) leave the usual threads to the writes.
"""

from __future__ import annotations

import http.client
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from bench import servers, wrk
from bench.servers import Running, Spec
from bench.sse import WAIT, Watchers, received

LATENCY, LOAD = "watch-latency", "watch-load"
SCENARIOS = (LATENCY, LOAD)
WATCHERS = (1, 50)  # default --watchers; watch-load uses the largest
WRITES = 200  # default --watch-writes
WRITE_INTERVAL = 0.05  # s from one write's start to the next one's: 20 writes/s at most
LOAD_CONNECTIONS = 16
LOAD_PREFIX = "u"  # every key of wrk's set-unique script: u<tag>-<thread>-<n>
# After a watch-load run whose watchers are due no event: how long any stray
# one has to arrive (a busy stream sends every 0.2 s) before they are counted.
SETTLE = 1.0
LOAD_GOAL = 0.90  # SET req/s with the watchers open / without
# The runs of a watch-load cell, in order: a name, and whether the watchers are open.
LOAD_RUNS = (
    ("none 1", False),
    ("with 1", True),
    ("none 2", False),
    ("with 2", True),
    ("none 3", False),
)


# -- the figures -----------------------------------------------------------------------


def latencies(acks: dict[str, float], arrivals: list[dict[str, float]]) -> tuple[list[float], int]:
    """Return each (write, watcher)'s latency in ms, arrival minus ack, and how many never came."""
    samples = []
    missed = 0
    for seen in arrivals:
        for key, ack in acks.items():
            if key in seen:
                samples.append((seen[key] - ack) * 1000)
            else:
                missed += 1
    return samples, missed


def percentile(values: list[float], q: float) -> float | None:
    """Return the nearest-rank q-th percentile of values, or None if there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def per_worker(watchers: int, workers: int) -> int:
    """Return max_watchers for each worker: n watchers can only be open spread evenly."""
    return max(1, math.ceil(watchers / workers))


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def put(address: tuple[str, int], key: str) -> tuple[float, float]:
    """PUT the bench's value at key on a fresh connection; return (ack time, round trip in s).

    The ack time is when the status line and headers of a 2xx have arrived.
    """
    started = time.perf_counter()
    conn = http.client.HTTPConnection(*address, timeout=WAIT)
    try:
        body = servers.VALUE.encode()
        conn.request("PUT", f"/kv/{key}", body=body, headers={"Content-Type": "text/plain"})
        response = conn.getresponse()
        acked = time.perf_counter()
        response.read()
    finally:
        conn.close()
    if not 200 <= response.status < 300:
        raise RuntimeError(f"PUT /kv/{key} answered {response.status}")
    return acked, acked - started


def revision(url: str) -> int:
    """Return the store's revision now (X-Kvapp-Revision of an empty listing)."""
    conn = http.client.HTTPConnection(*_address(url), timeout=WAIT)
    try:
        conn.request("GET", "/kv/?prefix=bench-revision-probe/")
        response = conn.getresponse()
        response.read()
    finally:
        conn.close()
    return int(response.headers["X-Kvapp-Revision"])


def _address(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("http://").partition(":")
    return host, int(port)


# -- the cells -------------------------------------------------------------------------


def start(tmp: Path, name: str, workers: int, watchers: int, threads: int) -> Running:
    """Start `kvapp serve` on a fresh SQLite file, with room for watchers over its workers."""
    limit = per_worker(watchers, workers)
    settings = {"max_watchers": str(limit), "threads": str(threads + limit)}
    spec = Spec("waitress", "kvapp", workers, "FULL")
    return Running(spec, tmp / f"watch-{name}.sqlite3", tmp / "servers.log", settings=settings)


def latency_cell(tmp: Path, workers: int, watchers: int, writes: int, threads: int) -> dict:
    """Return the row of one watch-latency cell: a server of its own, writes, the latencies."""
    running = start(tmp, f"latency-w{workers}-n{watchers}", workers, watchers, threads)
    try:
        address = _address(running.url)
        for n in range(5):  # warm-up: the first commits, outside any watched prefix
            put(address, f"warm/{n}")
        prefix = f"watch/w{workers}-n{watchers}/"
        keys = [f"{prefix}{n:06d}" for n in range(writes)]
        acks, trips = {}, []
        with Watchers(running.url, watchers, prefix, record=True) as streams:
            began = time.perf_counter()
            for n, key in enumerate(keys):
                time.sleep(max(0.0, began + n * WRITE_INTERVAL - time.perf_counter()))
                acks[key], trip = put(address, key)
                trips.append(trip * 1000)
            streams.wait(partial(received, count=writes), "the last events")
            refused = streams.refused
        samples, missed = latencies(acks, [stream.arrivals() for stream in streams.streams])
    finally:
        running.stop()
    return {
        "scenario": LATENCY,
        "server": "waitress",
        "workers": workers,
        "backend": "sqlite",
        "synchronous": "FULL",
        "watchers": watchers,
        "max_watchers": per_worker(watchers, workers),
        "writes": writes,
        "samples": len(samples),
        "p50_ms": _round(percentile(samples, 50)),
        "p99_ms": _round(percentile(samples, 99)),
        "max_ms": _round(max(samples, default=None)),
        "before_ack": sum(sample < 0 for sample in samples),
        "missed": missed,
        "refused": refused,
        "put_p50_ms": _round(percentile(trips, 50)),
        "put_p99_ms": _round(percentile(trips, 99)),
        "load_average": round(os.getloadavg()[0], 2),
    }


def load_cells(
    tmp: Path,
    workers: int,
    watchers: int,
    threads: int,
    warmup: int,
    cell: Callable[[Running, str, Callable[[], None] | None], dict],
    prefix: str = LOAD_PREFIX,
) -> list[dict]:
    """Return the rows of watch-load: set-unique without and with the watchers open, in turn.

    cell(running, tag, ended) measures one wrk run of set-unique (the matrix's
    cell), and calls ended() (if given) as soon as wrk has finished.
    """
    running = start(tmp, f"load-w{workers}", workers, watchers, threads)
    rows = []
    try:
        if warmup:
            wrk.run(running.url, "set-unique", LOAD_CONNECTIONS, warmup, tag=f"w{workers}warm")
        for part, opened in LOAD_RUNS:
            count = watchers if opened else 0
            tag = f"w{workers}{part.replace(' ', '')}"
            if not count:
                row = cell(running, tag, None)
                row.update(watchers=0, part=part, events_per_watcher=None, drain_s=None)
            else:
                with Watchers(running.url, count, prefix, record=False) as streams:
                    first = revision(running.url)
                    ended: list[float] = []
                    row = cell(running, tag, stamp_into(ended))
                    writes = revision(running.url) - first
                    expected = expected_events(prefix, writes)
                    streams.wait(partial(received, count=expected), "every write's event")
                    if not expected:
                        time.sleep(SETTLE)  # an event sent in error has time to come
                    last = max(stream.last_put for stream in streams.streams)
                    drain = max(0.0, last - ended[0])
                    # A write that wrk left in flight may commit after the watchers
                    # opened and before `first`: a watcher may get more than is due.
                    # Under a prefix no key falls under, any event is one too many.
                    short = sum(
                        stream.puts < expected if expected else stream.puts > 0
                        for stream in streams.streams
                    )
                row.update(watchers=count, part=part, drain_s=round(drain, 3), prefix=prefix)
                # The worst watcher: the fewest events, or any event where none were due.
                pick = min if expected else max
                row["events_per_watcher"] = pick(stream.puts for stream in streams.streams)
                row["writes_committed"] = writes
                row["events_expected"] = expected
                row["watchers_short"] = short
                row["errors"] += short
                row["reader_cpu_s"] = round(streams.reader_cpu, 2)
                row["refused"] = streams.refused
            row["scenario"], row["script"] = LOAD, "set-unique"
            rows.append(row)
    finally:
        running.stop()
    for row in rows:
        row["rps_ratio"] = load_ratio(rows) if row["watchers"] else None
    return rows


def load_prefix_error(prefix: str) -> str | None:
    """Return why the watchers of watch-load cannot watch prefix, or None.

    Under prefix every set-unique key must fall (its watchers get every
    write), or none of them (they get nothing: what watchers of other keys cost).
    """
    if LOAD_PREFIX.startswith(prefix) or not prefix.startswith(LOAD_PREFIX):
        return None
    return f"the watch-load prefix must be '', {LOAD_PREFIX!r} or not start with {LOAD_PREFIX!r}"


def expected_events(prefix: str, writes: int) -> int:
    """Return how many events each watcher of prefix gets for writes of set-unique."""
    return writes if LOAD_PREFIX.startswith(prefix) else 0


def stamp_into(times: list[float]) -> Callable[[], None]:
    """Return a function that appends the time (perf_counter) to times when it is called."""
    return lambda: times.append(time.perf_counter())


def load_ratio(rows: list[dict]) -> float | None:
    """Return the mean req/s of one server's runs with watchers over that of its runs without.

    None unless there is a run with them and at least two without.
    """
    with_them = [row["rps"] for row in rows if row["watchers"]]
    without = [row["rps"] for row in rows if not row["watchers"]]
    if not with_them or len(without) < 2 or not sum(without):
        return None
    return round(statistics.mean(with_them) / statistics.mean(without), 3)


# -- the run and its report ------------------------------------------------------------


def describe(
    scenarios, workers, watchers, writes: int, duration: int, prefix: str = LOAD_PREFIX
) -> list[str]:
    """Return what the watch cells of a run measure, one line each (for --dry-run)."""
    counts = ", ".join(map(str, workers))
    lines = []
    if LATENCY in scenarios:
        lines.append(
            f"{LATENCY}: waitress, sqlite FULL, workers {counts} x watchers"
            f" {', '.join(map(str, watchers))}: {writes} PUTs each, one every"
            f" {WRITE_INTERVAL * 1000:.0f} ms on fresh connections"
        )
    if LOAD in scenarios:
        lines.append(
            f"{LOAD}: waitress, sqlite FULL, workers {counts}: set-unique at {LOAD_CONNECTIONS}"
            f" connections for {duration} s each with"
            f" {', '.join(str(max(watchers) if opened else 0) for _, opened in LOAD_RUNS)}"
            f" watchers of prefix={prefix}"
        )
    return lines


def run(
    args,
    tmp: Path,
    threads: int,
    cell: Callable[[Running, str, Callable[[], None] | None], dict],
) -> list[dict]:
    """Measure the watch cells that args.scenarios asks for; return their rows."""
    rows: list[dict] = []
    if LATENCY in args.scenarios:
        for workers in args.workers:
            for watchers in args.watchers:
                row = latency_cell(tmp, workers, watchers, args.watch_writes, threads)
                rows.append(row)
                print(
                    f"  {LATENCY} w{workers} {watchers:3} watchers: p50 {_num(row['p50_ms'])} ms"
                    f"  p99 {_num(row['p99_ms'])} ms  max {_num(row['max_ms'])} ms"
                    f"  ({row['samples']} samples, {row['before_ack']} before ack,"
                    f" {row['missed']} missed, {row['refused']} refused)"
                    f"  load {row['load_average']}",
                    file=sys.stderr,
                    flush=True,
                )
    if LOAD in args.scenarios:
        for workers in args.workers:
            cells = load_cells(
                tmp, workers, max(args.watchers), threads, args.warmup, cell, args.watch_prefix
            )
            for row in cells:
                rows.append(row)
                print(
                    f"  {LOAD} w{workers} {row['watchers']:3} watchers ({row['part']}):"
                    f" {row['rps']:,.0f} req/s  p99 {row['p99_ms']:.2f} ms"
                    + (f"  ratio {row['rps_ratio']:.2f}" if row["rps_ratio"] else "")
                    + f"  errors {row['errors']}  load {row['load_average']}",
                    file=sys.stderr,
                    flush=True,
                )
    return rows


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def report_lines(rows: list[dict], threads: int, duration: int) -> list[str]:
    """Return the report's watch section: how the cells were measured, and their tables."""
    from bench import report

    latency = [row for row in rows if row["scenario"] == LATENCY]
    load = [row for row in rows if row["scenario"] == LOAD]
    lines = ["## Watch", ""]
    for paragraph in (__doc__ or "").split("\n\n")[1:]:
        lines += [" ".join(paragraph.split()), ""]
    lines += [
        f"Threads per worker: {threads} (config.ini) + max_watchers. samples: (write, watcher)"
        " pairs; before ack: samples whose event came before the PUT's answer (negative);"
        " missed: pairs whose event never came; PUT ms: each write's round trip, connect"
        " included.",
        "",
    ]
    if latency:
        lines += ["### Event latency", "", *report.watch_latency_table(latency), ""]
    if load:
        lines += [
            f"### Durable SET with watchers open (wrk set-unique, {duration} s per run)",
            "",
            *report.watch_targets_table(load, LOAD_GOAL),
            "",
            *report.watch_load_table(load),
            "",
            "events per watcher / due: the fewest events any watcher received, against the"
            " writes committed under its prefix during the run (the store's revision before and"
            " after; for a prefix no write falls under, none are due and it is the most any"
            " watcher received); drained"
            " in s: from the end of wrk's run to the last event read by any watcher (0: none came"
            " later than that); watchers' CPU s:"
            " the bench's thread that reads the watchers' sockets, which shares the cores with"
            " the server and wrk; errors include watchers that fell short.",
            "",
        ]
    return lines
