"""Benchmark kvapp with wrk, side by side with a hello-world ceiling, in one run.

    python -m bench                 the whole matrix (~1 hour at --duration 5)
    python -m bench --quick         a smoke run of a few cells (~1 minute)
    python -m bench --scale         1k, 1M and 10M keys: load, start, memory, GET/SET
    python -m bench --profile       py-spy profiles of the read and write paths
    python -m bench --scenarios watch-latency,watch-load   the watch cells only (~2 minutes)
    python -m bench --connections 16 --scenarios set-unique,txn   POST /txn against durable SET

Every cell is one wrk run (2 threads, 1 at 1 connection; keep-alive; loopback)
against a server this command starts on a free port with a temporary database:
an SQLite file, or a fresh database of a PostgreSQL cluster that this command
starts (initdb, fsync on; --backends).  Each figure is also given as a ratio
to its ceiling: the hello-world app (bench/hello.py) on the same server with
the same settings, workers and connections, driven by the same wrk script,
measured right before and right after the kvapp cells of that scenario.
The txn cells (one POST /txn: 2 conditions, 2 puts) are also given as a
ratio to set-unique (one durable SET of 1 key) on the same server, backend
and sync setting in the same run.
wrk shares the machine's cores with the servers, and other load skews
everything: compare ratios within one run.

The watch cells (bench/watch.py) have no ceiling: watch-latency times each
write's event from its acknowledgement to every watcher, and watch-load
compares durable SETs with and without watchers open on the same server.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import report, servers, watch, webdis, wrk
from bench.servers import Running, Spec
from kvapp.config import load_config
from tests import pgcluster

SCENARIOS = ("get-hit", "get-miss", "set-unique", "set-hot", "mix", "set-idle", "txn")
# Cells of their own (bench/watch.py), measured after the matrix.
ALL_SCENARIOS = SCENARIOS + watch.SCENARIOS
DEFAULT_OUT = servers.ROOT / "bench" / "results"
PG_INSTALL = "apt-get install postgresql"
REFERENCE_MISSING = (
    "redis-server or webdis is not installed, so webdis + Redis is not measured"
    " (apt-get install redis-server webdis adds it)"
)
# The benchmark's cluster makes commits durable, as SQLite's FULL does: fsync
# on (the tests' cluster turns it off); kvapp sets synchronous_commit = on.
PG_SETTINGS = {"fsync": "on", "full_page_writes": "on"}


def csv(convert):
    def parse(text: str):
        return tuple(convert(item) for item in text.split(",") if item)

    return parse


def sync_name(text: str) -> str:
    value = text.strip().upper()
    if value not in ("FULL", "NORMAL"):
        raise argparse.ArgumentTypeError(f"synchronous must be FULL or NORMAL, not {text!r}")
    return value


def server_name(text: str) -> str:
    if text not in servers.SERVERS:
        raise argparse.ArgumentTypeError(f"server must be one of {', '.join(servers.SERVERS)}")
    return text


def backend_name(text: str) -> str:
    if text not in servers.BACKENDS:
        raise argparse.ArgumentTypeError(f"backend must be one of {', '.join(servers.BACKENDS)}")
    return text


def default_backends(bindir: Path | None) -> tuple[tuple[str, ...], str | None]:
    """Return the backends measured when --backends is not given, and a note, or None."""
    if bindir is not None:
        return servers.BACKENDS, None
    return ("sqlite",), (
        "PostgreSQL's server binaries are not installed, so only SQLite is measured"
        f" ({PG_INSTALL} adds the PostgreSQL column)"
    )


def bindir_option(text: str) -> Path | None:
    return None if text == "none" else Path(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Return the options."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="1 s cells at 16 connections only")
    mode.add_argument("--scale", action="store_true", help="the scale part instead of the matrix")
    mode.add_argument("--profile", action="store_true", help="py-spy profiles instead")
    parser.add_argument("--duration", type=int, default=5, help="seconds per cell (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of warm-up per server")
    parser.add_argument(
        "--connections",
        type=csv(int),
        default=None,
        help="connection counts (default: 1,16,64,256; --profile: 16)",
    )
    parser.add_argument("--workers", type=csv(int), default=(1, 2))
    parser.add_argument("--sync", type=csv(sync_name), default=("FULL", "NORMAL"))
    parser.add_argument("--servers", type=csv(server_name), default=servers.SERVERS)
    parser.add_argument(
        "--backends",
        type=csv(backend_name),
        default=None,
        help="sqlite,postgresql (default: both when PostgreSQL's initdb is installed)",
    )
    parser.add_argument(
        "--scenarios",
        type=csv(str),
        default=None,
        help=f"default: {','.join(ALL_SCENARIOS)}; --quick: the matrix's only;"
        " --profile: get-hit,set-unique",
    )
    parser.add_argument(
        "--watchers",
        type=csv(int),
        default=watch.WATCHERS,
        help="watchers of the watch-latency cells; watch-load opens the largest"
        f" (default {','.join(map(str, watch.WATCHERS))})",
    )
    parser.add_argument(
        "--watch-writes",
        type=int,
        default=watch.WRITES,
        help=f"writes of each watch-latency cell (default {watch.WRITES})",
    )
    parser.add_argument(
        "--watch-prefix",
        default=watch.LOAD_PREFIX,
        help="prefix of watch-load's watchers: every set-unique key is under"
        f" '{watch.LOAD_PREFIX}' (the default: each watcher gets every write); another"
        " prefix gets none of them (what watchers of other keys cost)",
    )
    parser.add_argument("--keys", type=int, default=1000, help="keys loaded before GET cells")
    parser.add_argument(
        "--scale-keys",
        type=csv(int),
        default=(1000, 1_000_000, 10_000_000),
        help="database sizes of --scale, ascending; the first is the baseline",
    )
    parser.add_argument(
        "--granian-args",
        default="",
        help="extra granian options for kvapp and the ceiling alike, e.g. '--blocking-threads 4'",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where results go")
    parser.add_argument(
        "--pg-bindir",
        type=bindir_option,
        default=True,
        help="folder of PostgreSQL's initdb and pg_ctl (default: the newest"
        " /usr/lib/postgresql/*/bin, or PATH); none: as if PostgreSQL were not installed",
    )
    parser.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="skip webdis + Redis (appendfsync always), measured by default when"
        " redis-server and webdis are installed",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the servers, backends and scenarios a run would measure, and exit",
    )
    args = parser.parse_args(argv)
    if args.connections is None:
        args.connections = (16,) if args.profile else (1, 16, 64, 256)
    if args.scenarios is None:
        if args.profile:
            args.scenarios = ("get-hit", "set-unique")
        else:
            # --quick stays a minute long: its watch cells only when asked for.
            args.scenarios = SCENARIOS if args.quick else ALL_SCENARIOS
    if args.pg_bindir is True:
        args.pg_bindir = pgcluster.find_bindir()
    args.note = None
    if args.backends is None:
        args.backends, args.note = default_backends(args.pg_bindir)
    if args.reference and not webdis.installed():
        args.reference = False
        args.note = " and ".join(filter(None, [args.note, REFERENCE_MISSING]))
    if args.quick:
        args.reference = False
        args.duration, args.warmup = 1, 0
        args.connections, args.workers, args.sync = (16,), (1,), ("FULL",)
    unknown = set(args.scenarios) - set(SCENARIOS if args.profile else ALL_SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if not args.watchers or min(args.watchers) < 1 or args.watch_writes < 1:
        parser.error("--watchers and --watch-writes must be at least 1")
    if args.duration < 1:
        parser.error("--duration must be at least 1 (wrk counts whole seconds)")
    prefix_error = watch.load_prefix_error(args.watch_prefix)
    if prefix_error:
        parser.error(prefix_error)
    return args


def matrix_scenarios(args: argparse.Namespace) -> tuple[str, ...]:
    """Return the scenarios of the matrix (with ceilings) that this run measures."""
    return tuple(scenario for scenario in args.scenarios if scenario in SCENARIOS)


def check_tools(args: argparse.Namespace) -> str | None:
    """Return why the benchmark cannot run here, or None."""
    if wrk.find_wrk() is None:
        return wrk.INSTALL_HINT
    matrix = not (args.scale or args.profile)
    # The watch cells run `kvapp serve` (waitress) on SQLite alone.
    watch_only = matrix and not matrix_scenarios(args)
    if matrix and not watch_only and "postgresql" in args.backends and args.pg_bindir is None:
        return (
            f"PostgreSQL's server binaries (initdb, pg_ctl) are not installed: {PG_INSTALL}"
            " (or pass --backends sqlite)"
        )
    if not watch_only and "granian" in args.servers and not servers.granian_path().exists():
        return (
            "granian is not installed: pip install -r bench/requirements.txt"
            " (or pass --servers waitress)"
        )
    return None


def cell(
    running: Running,
    scenario: str,
    connections: int,
    args: argparse.Namespace,
    tag: str,
    ended: Callable[[], None] | None = None,
) -> dict:
    """Run wrk once against running; return the cell's row.  ended() is called when wrk is done."""
    spec = running.spec
    hello = spec.app == "hello"
    commits_before = running_commits(running)
    cpu_before, switches_before = running.cpu(), running.switches()
    result = wrk.run(
        running.url,
        scenario,
        connections,
        args.duration,
        keys=args.keys,
        tag=tag,
        all_404=False if hello else None,
        must_succeed=False if hello else None,
    )
    if ended is not None:
        ended()
    cpu_after, switches_after = running.cpu(), running.switches()
    commits_after = running_commits(running)
    requests = max(result.requests, 1)
    writes_per_commit = None
    if commits_before is not None and commits_after is not None:
        commits = commits_after[0] - commits_before[0]
        if commits > 0:
            writes_per_commit = round((commits_after[1] - commits_before[1]) / commits, 2)
    return {
        "server": spec.server,
        "workers": spec.workers,
        "app": spec.app,
        "backend": spec.backend,
        # PostgreSQL commits with synchronous_commit = on (kvapp's FULL).
        "synchronous": "on" if spec.backend == "postgresql" else spec.synchronous,
        "scenario": scenario,
        "connections": connections,
        "rps": round(result.rps, 1),
        "p50_ms": round(result.p50_ms, 3),
        "p99_ms": round(result.p99_ms, 3),
        "errors": result.errors,
        "requests": result.requests,
        "load_average": round(os.getloadavg()[0], 2),
        # The server's own cost per request: CPU (all its processes and
        # threads) and context switches; wrk's is not included.
        "cpu_user_us": round((cpu_after[0] - cpu_before[0]) / requests * 1e6),
        "cpu_system_us": round((cpu_after[1] - cpu_before[1]) / requests * 1e6),
        "switches": round(servers.switches_between(switches_before, switches_after) / requests, 1),
        "writes_per_commit": writes_per_commit,
    }


def waitress_threads() -> int:
    """Return the threads per worker that config.ini gives the waitress servers started here."""
    return load_config(servers.ROOT / "config.ini", environ={}).threads


def running_commits(running: Running) -> tuple[float, float] | None:
    """Return kvapp's (commits, writes) so far; workers add theirs to /metrics within 1 s."""
    if running.spec.app != "kvapp":
        return None
    if running.spec.workers > 1:
        time.sleep(1.2)
    return running.commits()


def progress(row: dict) -> None:
    print(
        f"  {row['server']:8} w{row['workers']} {report.backend_label(row):10}"
        f" {row['synchronous'] or '-':6} {row['scenario']:10} c{row['connections']:<3}"
        f" {row['rps']:>9,.0f} req/s  p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms"
        f"  errors {row['errors']}  load {row['load_average']}",
        file=sys.stderr,
        flush=True,
    )


def kvapp_specs(server: str, workers: int, args: argparse.Namespace, extra: tuple) -> list[Spec]:
    """Return the kvapp servers of one group: each SQLite sync setting, then PostgreSQL."""
    specs = []
    for backend in servers.BACKENDS:
        if backend in args.backends:
            # synchronous does not apply to PostgreSQL's column: it always runs
            # with kvapp's FULL, which is synchronous_commit = on.
            syncs = args.sync if backend == "sqlite" else ("FULL",)
            specs += [Spec(server, "kvapp", workers, sync, extra, backend) for sync in syncs]
    return specs


def run_matrix(args: argparse.Namespace, tmp: Path) -> list[dict]:
    """Measure every cell; return the rows, each ceiling first, with their ratios.

    The hello-world server and the kvapp servers (one per SQLite synchronous
    setting, one on PostgreSQL) run side by side for each server and worker
    count.  For each connection count and scenario, the ceiling (the
    hello-world server driven by that scenario's wrk script) is measured right
    before and right after kvapp's cells and averaged, so that load from
    elsewhere on the machine skews both alike.
    """
    if not matrix_scenarios(args):
        return []
    with contextlib.ExitStack() as stack:
        cluster = None
        if "postgresql" in args.backends:
            started = time.monotonic()
            cluster = pgcluster.Cluster(args.pg_bindir, PG_SETTINGS)
            stack.enter_context(pgcluster.running(cluster))
            print(
                f"  PostgreSQL cluster started in {time.monotonic() - started:.1f} s"
                f" ({cluster.folder})",
                file=sys.stderr,
                flush=True,
            )
        rows: list[dict] = []
        for server, workers in itertools.product(args.servers, args.workers):
            rows += run_group(args, tmp, server, workers, cluster)
        reference = [scenario for scenario in args.scenarios if scenario in webdis.SCENARIOS]
        if args.reference and reference:
            for row in webdis.measure(tmp / "webdis", args.connections, args.duration, args.keys):
                if row["scenario"] in reference:
                    rows.append(row)
                    progress(row)
    rows.sort(key=order)
    report.add_ratios(rows)
    return rows


def run_group(
    args: argparse.Namespace,
    tmp: Path,
    server: str,
    workers: int,
    cluster: pgcluster.Cluster | None,
) -> list[dict]:
    """Measure the cells of one server and worker count; return their rows."""
    extra = tuple(shlex.split(args.granian_args)) if server == "granian" else ()
    log = tmp / "servers.log"
    rows: list[dict] = []
    running: list[Running] = []
    try:
        for spec in [Spec(server, "hello", workers, None, extra)] + kvapp_specs(
            server, workers, args, extra
        ):
            database: Path | str | None = None
            if spec.backend == "sqlite":
                database = tmp / f"{server}-{workers}-{spec.synchronous}.sqlite3"
            elif spec.backend == "postgresql":
                assert cluster is not None
                database = cluster.create_database()  # fresh for each kvapp server
            if database is not None:
                servers.load_keys(database, args.keys)
            running.append(Running(spec, database, log))
        hello, apps = running[0], running[1:]
        for target in running if args.warmup else ():
            wrk.run(target.url, "get-hit", 16, args.warmup, keys=args.keys, all_404=False)
        for connections, scenario in itertools.product(args.connections, matrix_scenarios(args)):
            before = cell(hello, scenario, connections, args, "")
            measured = [
                # The tag keeps set-unique's keys new at each connection count.
                cell(app, scenario, connections, args, f"c{connections}")
                for app in apps
            ]
            after = cell(hello, scenario, connections, args, "")
            for row in [average(before, after), *measured]:
                rows.append(row)
                progress(row)
    finally:
        for target in running:
            target.stop()
    return rows


def run_watch(args: argparse.Namespace, tmp: Path) -> list[dict]:
    """Measure the watch cells that args.scenarios names (bench/watch.py); return their rows."""

    def set_unique(running: Running, tag: str, ended: Callable[[], None] | None) -> dict:
        return cell(running, "set-unique", watch.LOAD_CONNECTIONS, args, tag, ended)

    return watch.run(args, tmp, waitress_threads(), set_unique)


def average(before: dict, after: dict) -> dict:
    """Return the ceiling row of two runs: mean figures, both req/s kept."""
    row = dict(before)
    for name in ("rps", "p50_ms", "p99_ms"):
        row[name] = round((before[name] + after[name]) / 2, 3)
    for name in ("cpu_user_us", "cpu_system_us", "switches"):
        row[name] = round((before[name] + after[name]) / 2, 1)
    row["errors"] = before["errors"] + after["errors"]
    row["requests"] = before["requests"] + after["requests"]
    row["rps_before"], row["rps_after"] = before["rps"], after["rps"]
    return row


def order(row: dict) -> tuple:
    """Sort key: server, workers, scenario, connections, then ceiling, SQLite, PostgreSQL."""
    kinds = (None, *servers.BACKENDS, "redis")
    names = (*servers.SERVERS, "webdis")
    return (
        names.index(row["server"]),
        row["workers"],
        SCENARIOS.index(row["scenario"]),
        row["connections"],
        kinds.index(row["backend"]),
        row["synchronous"] or "",
    )


def matrix_document(
    args: argparse.Namespace,
    rows: list[dict],
    watch_rows: list[dict],
    env: dict,
    argv: list[str],
):
    command = "python -m bench " + " ".join(shlex.quote(a) for a in argv)
    kind = "quick" if args.quick else "matrix" if rows else "watch"
    loads = [row["load_average"] for row in rows + watch_rows]
    lines = [
        f"# kvapp benchmark ({kind}), {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"Machine: {env['cores']} cores, {env['platform']}; Python {env['python']},"
        f" waitress {env['waitress']}, granian {env['granian']}, {env['wrk']},"
        f" PostgreSQL {env['postgresql']};"
        f" commit {env['commit']}.",
        f"Load average (1 min): {env['load_average_start']:.2f} at the start,"
        f" {min(loads, default=0):.2f} to {max(loads, default=0):.2f} during the cells.",
        "",
    ]
    if rows:
        lines += matrix_lines(args, rows, env)
    if watch_rows:
        lines += watch.report_lines(watch_rows, waitress_threads(), args.duration)
    document: dict = {"kind": kind, "command": command.strip()}
    document.update({"environment": env, "duration_s": args.duration, "keys": args.keys})
    document.update({"granian_args": args.granian_args, "backends": list(args.backends)})
    document["rows"] = rows
    if watch_rows:
        document.update(watchers=list(args.watchers), watch_writes=args.watch_writes)
        document["watch_rows"] = watch_rows
    while not lines[-1]:
        lines.pop()
    return document, lines


def matrix_lines(args: argparse.Namespace, rows: list[dict], env: dict) -> list[str]:
    """Return the report's part on the matrix: how it was measured, its tables."""
    lines = [
        *report.method(args.duration, args.keys, len(wrk.VALUE), args.backends, env),
        f"granian options: `{args.granian_args or '(defaults)'}`; waitress: config.ini"
        f" ({waitress_threads()} threads per worker).",
        "",
    ]
    targets = report.targets_table(rows)
    if targets:
        lines += ["## Targets", "", *targets, ""]
    load_targets = report.load_targets_table(rows)
    if load_targets:
        lines += ["## Many clients at once", "", *load_targets, ""]
    transactions = report.txn_table(rows)
    if transactions:
        note = report.TXN_NOTE.format(value=len(wrk.VALUE))
        lines += ["## Transactions", "", note, "", *transactions, ""]
    if args.reference:
        lines += [
            f"webdis + Redis ({env['reference']}): {webdis.__doc__.splitlines()[0]}"
            f" webdis runs {webdis.WEBDIS_THREADS} threads (column workers);"
            " its CPU is redis-server's and webdis' together.",
            "",
        ]
    return lines + ["## All cells", "", *report.matrix_table(rows), ""]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    matrix = not (args.scale or args.profile)
    if args.dry_run:
        if matrix and args.note:
            print(f"bench: {args.note}", file=sys.stderr)
        print(f"servers: {', '.join(args.servers)}")
        print(f"backends: {', '.join(args.backends)}")
        print(f"scenarios: {', '.join(args.scenarios)}")
        print(f"reference: {'webdis + Redis' if args.reference else 'none'}")
        if matrix:
            for line in watch.describe(
                args.scenarios,
                args.workers,
                args.watchers,
                args.watch_writes,
                args.duration,
                args.watch_prefix,
            ):
                print(line)
        return 0
    problem = check_tools(args)
    if problem:
        print(f"bench: {problem}", file=sys.stderr)
        return 2
    if matrix and args.note:
        print(f"bench: {args.note}", file=sys.stderr)
    env = report.environment(args.pg_bindir)
    with tempfile.TemporaryDirectory(prefix="kvapp-bench-") as name:
        tmp = Path(name)
        if args.scale:
            from bench import scale

            document, lines = scale.run(args, tmp, env, argv)
            kind = "scale"
        elif args.profile:
            from bench import profile

            document, lines = profile.run(args, tmp, env, argv)
            kind = "profile"
        else:
            rows = run_matrix(args, tmp)
            watch_rows = run_watch(args, tmp)
            document, lines = matrix_document(args, rows, watch_rows, env, argv)
            kind = document["kind"]
    markdown, data = report.write(args.out, f"{report.stamp()}-{kind}", document, lines)
    print("\n".join(lines))
    print(f"\nwritten: {markdown} and {data}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
