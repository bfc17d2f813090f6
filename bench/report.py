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

ROOT = Path(__file__).resolve().parent.parent

# The targets, at 16 connections, as (server, scenario, synchronous, goal).
TARGETS = (
    ("waitress", "get-hit", "FULL", 0.90),
    ("waitress", "set-unique", "FULL", 0.80),
    ("granian", "get-hit", "FULL", 0.60),
    ("granian", "set-unique", "FULL", 0.40),
)


def add_ratios(rows: list[dict]) -> None:
    """Give each row its req/s, p50 and p99 as ratios to the ceiling row of its group."""
    ceilings = {
        (row["server"], row["workers"], row["connections"]): row
        for row in rows
        if row["scenario"] == "ceiling"
    }
    for row in rows:
        ceiling = ceilings.get((row["server"], row["workers"], row["connections"]))
        for name in ("rps", "p50_ms", "p99_ms"):
            base = ceiling[name] if ceiling else 0
            row[f"{name}_ratio"] = round(row[name] / base, 3) if base else None


def environment() -> dict:
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
        "commit": command_output("git", "describe", "--always", "--dirty"),
        "load_average_start": os.getloadavg()[0],
    }


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def matrix_table(rows: list[dict]) -> list[str]:
    lines = [
        "| server | workers | sync | scenario | conns | req/s | ×ceil | p50 ms | ×ceil"
        " | p99 ms | ×ceil | errors |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['server']} | {row['workers']} | {row['synchronous'] or '-'}"
            f" | {row['scenario']} | {row['connections']} | {_num(row['rps'])}"
            f" | {_ratio(row['rps_ratio'])} | {_num(row['p50_ms'], 2)}"
            f" | {_ratio(row['p50_ms_ratio'])} | {_num(row['p99_ms'], 2)}"
            f" | {_ratio(row['p99_ms_ratio'])} | {row['errors']} |"
        )
    return lines


def targets_table(rows: list[dict]) -> list[str]:
    lines = [
        "| target (1 worker, 16 connections) | req/s | ceiling req/s (before, after)"
        " | ratio | goal | met |",
        "|---|---:|---:|---:|---:|---|",
    ]
    cells = {
        (r["server"], r["workers"], r["synchronous"], r["scenario"], r["connections"]): r
        for r in rows
    }
    for server, scenario, synchronous, goal in TARGETS:
        row = cells.get((server, 1, synchronous, scenario, 16))
        ceiling = cells.get((server, 1, None, "ceiling", 16))
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


def scale_table(rows: list[dict]) -> list[str]:
    lines = [
        "| server | keys | db MiB | load s | start s | RSS MiB idle | scenario | req/s"
        " | × 1k keys | p50 ms | p99 ms | RSS MiB after | errors |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['server']} | {row['keys']:,} | {_num(row['db_mib'])}"
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
