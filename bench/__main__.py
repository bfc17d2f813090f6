"""Benchmark kvapp with wrk, side by side with a hello-world ceiling, in one run.

    python -m bench                 the whole matrix (~12 minutes at --duration 5)
    python -m bench --quick         a smoke run of a few cells (~20 s)
    python -m bench --scale         1k, 1M and 10M keys: load, start, memory, GET/SET
    python -m bench --profile       py-spy profiles of the read and write paths

Every cell is one wrk run (2 threads, 1 at 1 connection; keep-alive; loopback)
against a server this command starts on a free port with a temporary database.
Each figure is also given as a ratio to its ceiling: the hello-world app
(bench/hello.py) on the same server with the same settings, workers and
connections, driven by the same wrk script.  wrk shares the machine's cores
with the server, and other load skews everything: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from bench import report, servers, wrk
from bench.servers import Running, Spec

SCENARIOS = ("get-hit", "get-miss", "set-unique", "set-hot", "mix")
DEFAULT_OUT = servers.ROOT / "bench" / "results"


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    parser.add_argument("--connections", type=csv(int), default=(1, 16, 64))
    parser.add_argument("--workers", type=csv(int), default=(1, 2))
    parser.add_argument("--sync", type=csv(sync_name), default=("FULL", "NORMAL"))
    parser.add_argument("--servers", type=csv(server_name), default=servers.SERVERS)
    parser.add_argument("--scenarios", type=csv(str), default=SCENARIOS)
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
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 1, 0
        args.connections, args.workers, args.sync = (16,), (1,), ("FULL",)
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if args.duration < 1:
        parser.error("--duration must be at least 1 (wrk counts whole seconds)")
    return args


def check_tools(args: argparse.Namespace) -> str | None:
    """Return why the benchmark cannot run here, or None."""
    if wrk.find_wrk() is None:
        return wrk.INSTALL_HINT
    if "granian" in args.servers and not servers.granian_path().exists():
        return (
            "granian is not installed: pip install -r bench/requirements.txt"
            " (or pass --servers waitress)"
        )
    return None


def cell(
    running: Running, scenario: str, connections: int, args: argparse.Namespace, tag: str
) -> dict:
    result = wrk.run(running.url, scenario, connections, args.duration, keys=args.keys, tag=tag)
    return {
        "server": running.spec.server,
        "workers": running.spec.workers,
        "synchronous": running.spec.synchronous,
        "scenario": "ceiling" if running.spec.app == "hello" else scenario,
        "connections": connections,
        "rps": round(result.rps, 1),
        "p50_ms": round(result.p50_ms, 3),
        "p99_ms": round(result.p99_ms, 3),
        "errors": result.errors,
        "requests": result.requests,
        "load_average": round(os.getloadavg()[0], 2),
    }


def progress(row: dict) -> None:
    print(
        f"  {row['server']:8} w{row['workers']} {row['synchronous'] or '-':6}"
        f" {row['scenario']:10} c{row['connections']:<3} {row['rps']:>9,.0f} req/s"
        f"  p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms"
        f"  errors {row['errors']}  load {row['load_average']}",
        file=sys.stderr,
        flush=True,
    )


def run_matrix(args: argparse.Namespace, tmp: Path) -> list[dict]:
    """Measure every cell; return the rows, ceilings first, with their ratios.

    The hello-world server and one kvapp server per synchronous setting run
    side by side for each server and worker count.  For each connection count
    the ceiling is measured right before and right after kvapp's cells and
    averaged, so that load from elsewhere on the machine skews both alike.
    """
    rows: list[dict] = []
    granian_args = tuple(shlex.split(args.granian_args))
    log = tmp / "servers.log"
    for server, workers in itertools.product(args.servers, args.workers):
        extra = granian_args if server == "granian" else ()
        running: list[Running] = []
        try:
            for spec in [Spec(server, "hello", workers, None, extra)] + [
                Spec(server, "kvapp", workers, sync, extra) for sync in args.sync
            ]:
                database = None
                if spec.app == "kvapp":
                    database = tmp / f"{server}-{workers}-{spec.synchronous}.sqlite3"
                    servers.load_keys(database, args.keys)
                running.append(Running(spec, database, log))
            hello, apps = running[0], running[1:]
            for target in running if args.warmup else ():
                wrk.run(target.url, "get-hit", 16, args.warmup, keys=args.keys)
            for connections in args.connections:
                before = cell(hello, "get-hit", connections, args, "")
                measured = [
                    cell(app, scenario, connections, args, str(len(rows) + i))
                    for i, (app, scenario) in enumerate(itertools.product(apps, args.scenarios))
                ]
                after = cell(hello, "get-hit", connections, args, "")
                rows.append(average(before, after))
                progress(rows[-1])
                for row in measured:
                    rows.append(row)
                    progress(row)
        finally:
            for target in running:
                target.stop()
    rows.sort(key=order)
    report.add_ratios(rows)
    return rows


def average(before: dict, after: dict) -> dict:
    """Return the ceiling row of two runs: mean figures, both req/s kept."""
    row = dict(before)
    for name in ("rps", "p50_ms", "p99_ms"):
        row[name] = round((before[name] + after[name]) / 2, 3)
    row["errors"] = before["errors"] + after["errors"]
    row["requests"] = before["requests"] + after["requests"]
    row["rps_before"], row["rps_after"] = before["rps"], after["rps"]
    return row


def order(row: dict) -> tuple:
    """Sort key: server, workers, ceiling then FULL then NORMAL, scenario, connections."""
    scenarios = ("ceiling", *SCENARIOS)
    return (
        servers.SERVERS.index(row["server"]),
        row["workers"],
        row["synchronous"] or "",
        scenarios.index(row["scenario"]),
        row["connections"],
    )


def matrix_document(args: argparse.Namespace, rows: list[dict], env: dict, argv: list[str]):
    command = "python -m bench " + " ".join(shlex.quote(a) for a in argv)
    kind = "quick" if args.quick else "matrix"
    lines = [
        f"# kvapp benchmark ({kind}), {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"Machine: {env['cores']} cores, {env['platform']}; Python {env['python']},"
        f" waitress {env['waitress']}, granian {env['granian']}, {env['wrk']};"
        f" commit {env['commit']}.",
        f"Load average (1 min): {env['load_average_start']:.2f} at the start,"
        f" {min(r['load_average'] for r in rows):.2f} to"
        f" {max(r['load_average'] for r in rows):.2f} during the cells.",
        "",
        f"Each cell: wrk for {args.duration} s, 2 threads (1 at 1 connection), keep-alive,"
        f" loopback; {args.keys} keys loaded; SET stores {len(wrk.VALUE)} bytes."
        " ×ceil: the figure divided by the hello-world ceiling's on the same server, workers"
        " and connections (for latencies above 1 is slower); the ceiling is the mean of a run"
        " right before and one right after kvapp's cells at that connection count."
        " errors: socket errors, timeouts and answers of an unexpected status"
        " (get-miss expects 404).",
        f"granian options: `{args.granian_args or '(defaults)'}`; waitress: config.ini"
        " (4 threads per worker).",
        "",
    ]
    targets = report.targets_table(rows)
    if targets:
        lines += ["## Targets", "", *targets, ""]
    lines += ["## All cells", "", *report.matrix_table(rows)]
    document = {"kind": kind, "command": command.strip()}
    document.update({"environment": env, "duration_s": args.duration, "keys": args.keys})
    document.update({"granian_args": args.granian_args, "rows": rows})
    return document, lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    problem = check_tools(args)
    if problem:
        print(f"bench: {problem}", file=sys.stderr)
        return 2
    env = report.environment()
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
            document, lines = matrix_document(args, rows, env, argv)
            kind = document["kind"]
    markdown, data = report.write(args.out, f"{report.stamp()}-{kind}", document, lines)
    print("\n".join(lines))
    print(f"\nwritten: {markdown} and {data}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
