"""Where the time goes (`python -m bench --profile`): py-spy samples a server under wrk load.

For each server (1 worker, synchronous=FULL) and for the read path (get-hit)
and the write path (set-unique), py-spy samples the worker process at 250 Hz
while wrk runs at each --connections count (default 16), twice: "GIL" keeps only the thread that
holds the GIL (the Python work that one process can do one thread at a time),
"busy" keeps every thread that is not waiting (so also time inside C calls that
release the GIL, such as SQLite's and fsync).  Samples whose innermost frame
only waits (Condition.wait, a lock, select) and samples without a Python frame
(granian's Rust threads) are left out of "busy".  "Self" is the innermost
frame, with its line; "total" counts a function once per sample in which it is anywhere on
the stack.  The raw stacks are kept next to the table (flamegraph.pl or
speedscope read them).
"""

from __future__ import annotations

import argparse
import itertools
import re
import shlex
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from bench import report, servers, wrk
from bench.servers import Running, Spec

MODES = ("gil", "busy")
TOP = 12
RATE = 250  # samples per second
_LINE = re.compile(r":\d+\)$")
# Innermost frames of a thread that waits rather than works.
_WAITING = ("Condition.wait ", "Lock.acquire ", "Event.wait ", "Queue.get ", "select ")


def py_spy_path() -> Path:
    return Path(sys.executable).with_name("py-spy")


def summarize(raw: str) -> tuple[int, Counter, Counter]:
    """Return (samples, self samples by function, total samples by function) of raw stacks."""
    samples, own, total = 0, Counter(), Counter()
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # "function (path/file.py:line)" -> "function (file.py)"; sys.prefix is dropped.
        frames_with_lines = [
            frame for frame in stack.split(";") if not frame.startswith("process ")
        ]
        if not frames_with_lines or frames_with_lines[-1].startswith(_WAITING):
            continue
        frames = [_LINE.sub(")", frame) for frame in frames_with_lines]
        samples += count
        own[frames_with_lines[-1]] += count  # with its line: which call inside the function
        for frame in set(frames):
            total[frame] += count
    return samples, own, total


def record(
    running: Running,
    scenario: str,
    connections: int,
    mode: str,
    args: argparse.Namespace,
    raw_path: Path,
) -> str:
    """Run wrk and py-spy together; return py-spy's raw stacks."""
    seconds = args.duration
    load = threading.Thread(
        target=wrk.run,
        args=(running.url, scenario, connections, seconds + 2),
        kwargs={"keys": args.keys, "tag": "profile"},
    )
    load.start()
    try:
        time.sleep(1)
        worker = running.pids()[-1]  # 1 worker: waitress's only process, granian's child
        command = [str(py_spy_path()), "record", "--pid", str(worker), "--rate", str(RATE)]
        command += ["--duration", str(seconds), "--format", "raw", "--output", str(raw_path)]
        command += ["--gil"] if mode == "gil" else []
        subprocess.run(command, capture_output=True, check=True, timeout=seconds + 60)
    finally:
        load.join()
    return raw_path.read_text()


def shown(path: Path) -> str:
    """Return path relative to the checkout when it is inside it."""
    try:
        return str(path.resolve().relative_to(servers.ROOT))
    except ValueError:
        return str(path)


def table(samples: int, counts: Counter) -> list[str]:
    lines = ["| share | samples | function |", "|---:|---:|---|"]
    if not samples:
        return lines
    for frame, count in counts.most_common(TOP):
        lines.append(f"| {count / samples:.1%} | {count} | `{frame}` |")
    return lines


def run(args: argparse.Namespace, tmp: Path, env: dict, argv: list[str]):
    if not py_spy_path().exists():
        raise SystemExit("bench: py-spy is not installed: pip install -r bench/requirements.txt")
    stamp = report.stamp()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    granian_args = tuple(shlex.split(args.granian_args))
    command = "python -m bench " + " ".join(shlex.quote(a) for a in argv)
    lines = [
        f"# kvapp profile, {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"Command: `{command.strip()}`; commit {env['commit']};"
        f" load average {env['load_average_start']:.2f} at the start.",
        "",
        __doc__.split("\n\n", 1)[1].strip().replace("\n", " "),
        "",
    ]
    document: dict = {"kind": "profile", "command": command.strip(), "environment": env}
    document["profiles"] = []
    for server in args.servers:
        extra = granian_args if server == "granian" else ()
        database = tmp / f"profile-{server}.sqlite3"
        servers.load_keys(database, args.keys)
        running = Running(Spec(server, "kvapp", 1, "FULL", extra), database, tmp / "log")
        try:
            wrk.run(running.url, "get-hit", 16, 1, keys=args.keys)  # warm-up
            cells = itertools.product(args.connections, args.scenarios, MODES)
            for connections, scenario, mode in cells:
                name = f"{server}-{scenario}-c{connections}-{mode}"
                raw_path = out / f"{stamp}-profile-{name}.txt"
                raw = record(running, scenario, connections, mode, args, raw_path)
                samples, own, total = summarize(raw)
                print(f"  {name}: {samples} samples", file=sys.stderr)
                lines += [
                    f"## {server}, {scenario}, {connections} connections, {mode}:"
                    f" {samples} samples",
                    "",
                ]
                lines += ["Self:", "", *table(samples, own), ""]
                lines += ["Total:", "", *table(samples, total), ""]
                lines += [f"Raw stacks: `{shown(raw_path)}`", ""]
                document["profiles"].append(
                    {
                        "server": server,
                        "scenario": scenario,
                        "connections": connections,
                        "mode": mode,
                        "samples": samples,
                        "self": own.most_common(40),
                        "total": total.most_common(40),
                        "raw": shown(raw_path),
                    }
                )
        finally:
            running.stop()
    return document, lines
