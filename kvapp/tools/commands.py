"""The data tools' commands: backup, export, import, copy, check, stats.

Each prints its result on stdout (export to - excepted: its stdout is the
data), draws a progress bar on stderr only when stderr is a terminal, and
on failure prints one line, `kvapp COMMAND: reason`, on stderr and exits 1
(2 for a usage error, 128+N when stopped by signal N).  No run leaves a
half-written destination: files are written aside and renamed (kvapp.tools.atomicfile),
databases take bounded transactions and are cleaned up on failure
(kvapp.tools.targets, kvapp.tools.transfer).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TextIO

from kvapp.config import ConfigError, Settings, load_config
from kvapp.store.base import DatabaseUnusable, StorageError
from kvapp.store.location import redact
from kvapp.tools import atomicfile, exportformat, sqlitefile, targets, transfer
from kvapp.tools.progress import bar

Command = Callable[[argparse.Namespace, Settings, transfer.Tally], int]


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class Interrupted(BaseException):
    """A signal asked the command to stop; a BaseException, like KeyboardInterrupt."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def _say(text: str) -> None:
    print(text, flush=True)


def _database(args: argparse.Namespace, settings: Settings) -> str:
    return args.database or settings.database


# -- the commands -----------------------------------------------------------


def backup(args: argparse.Namespace, settings: Settings, tally: transfer.Tally) -> int:
    source = targets.sqlite_path(_database(args, settings), "backup")
    target = Path(args.file).resolve()
    targets.refuse_own_files(target, str(source))
    started = time.monotonic()
    with bar(None, "page", "backup") as progress, atomicfile.aside(target, args.force) as temp:

        def step(done: int, total: int) -> None:
            progress.total = total
            progress.update(done - progress.n)

        pages = sqlitefile.backup(source, temp, step)
    _say(
        f"backed up {source} to {target}: {pages} pages, {target.stat().st_size} bytes"
        f" in {time.monotonic() - started:.1f} s"
    )
    return 0


def _standard(stream: TextIO | None, name: str) -> BinaryIO:
    """Return the bytes of stdin or stdout, given as "-"; StoreError if it was closed.

    A program started with that descriptor closed (<&-, >&-) has None there.
    """
    if stream is None:
        raise targets.StoreError(f"{name} is closed: give a file name instead of -")
    return stream.buffer


def export(args: argparse.Namespace, settings: Settings, tally: transfer.Tally) -> int:
    url = _database(args, settings)
    started = time.monotonic()
    if args.file == "-":
        _standard(sys.stdout, "stdout")  # before the store is opened
    else:
        targets.refuse_own_files(Path(args.file), url)
        atomicfile.check_destination(Path(args.file), args.force)
    store = targets.open_existing(url, settings)
    try:
        with bar(store.stats()[0], "rec", "export") as progress:
            if args.file == "-":
                count = transfer.export(store, sys.stdout.buffer, progress)
                sys.stdout.buffer.flush()
                return 0
            with atomicfile.replacing(Path(args.file), replace=args.force) as out:
                count = transfer.export(store, out, progress)
    finally:
        store.close()
    _say(
        f"exported {count} records from {redact(url)} to {args.file}"
        f" in {time.monotonic() - started:.1f} s"
    )
    return 0


def import_(args: argparse.Namespace, settings: Settings, tally: transfer.Tally) -> int:
    url = _database(args, settings)
    started = time.monotonic()
    from_stdin = args.file == "-"
    source = _standard(sys.stdin, "stdin") if from_stdin else open(args.file, "rb")
    try:
        size = os.fstat(source.fileno()).st_size if source.seekable() else None
        with targets.destination(url, settings, args.merge) as target:
            if target.fresh:
                # A bad line discards the new file, so one pass checks and loads.
                with bar(size, "B", "import") as progress:
                    records = exportformat.read(
                        transfer.lines(source, progress), settings.max_key_bytes
                    )
                    count = transfer.load(records, target, tally)
            else:
                # Into an existing store the whole file is checked first: a
                # bad line anywhere fails the import before it writes anything.
                with bar(size, "B", "check") as progress:
                    again, count, highest = transfer.check_input(
                        source, settings.max_key_bytes, progress
                    )
                try:
                    with bar(count, "rec", "import") as progress:
                        records = exportformat.read(again, settings.max_key_bytes)
                        transfer.load(records, target, tally, progress, highest)
                finally:
                    if again is not source:
                        again.close()
    finally:
        if not from_stdin:
            source.close()
    _say(
        f"imported {count} records from {args.file} into {redact(url)}"
        f" in {time.monotonic() - started:.1f} s"
    )
    return 0


def copy(args: argparse.Namespace, settings: Settings, tally: transfer.Tally) -> int:
    if targets.same_store(args.source, args.target):
        raise targets.StoreError("--from and --to name the same store")
    started = time.monotonic()
    source = targets.open_existing(args.source, settings)
    try:
        total = source.stats()[0]
        with targets.destination(args.target, settings, args.merge) as target:
            with bar(total, "rec", "copy") as progress:
                highest = source.revision()  # before the first page is read
                transfer.load(transfer.records(source), target, tally, progress, highest)
    finally:
        source.close()
    _say(
        f"copied {tally.records} records from {redact(args.source)}"
        f" to {redact(args.target)} in {time.monotonic() - started:.1f} s"
    )
    return 0


def check(args: argparse.Namespace, settings: Settings, tally: transfer.Tally) -> int:
    path = targets.sqlite_path(_database(args, settings), "check")
    problems = sqlitefile.check(path)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        # integrity_check's rows may span lines ("*** in database main ***\n...").
        first = " ".join(problems[0].split())
        print(f"kvapp check: {path}: {first}{more}", file=sys.stderr)
        return 1
    _say(f"ok: {path} passed PRAGMA integrity_check and kvapp's schema checks")
    return 0


def stats(args: argparse.Namespace, settings: Settings, tally: transfer.Tally) -> int:
    figures = sqlitefile.stats(targets.sqlite_path(_database(args, settings), "stats"))
    if args.json:
        _say(json.dumps(figures))
    else:
        width = max(len(name) for name in figures)
        for name, value in figures.items():
            _say(f"{name.replace('_', ' '):<{width}}  {value}")
    return 0


# -- the command line -------------------------------------------------------

DATABASE_HELP = "the database (default: the one config.ini or KVAPP_DATABASE names)"
# One rule for the four commands that write, as cp -n: what is there is kept unless asked.
DESTINATION_RULE = (
    "A destination that holds data is refused: an existing FILE (backup, export) unless"
    " --force, a database with keys (import, copy) unless --merge."
)
FORCE_HELP = "replace an existing FILE (only once the new one is complete)"


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add the data tools to the subcommands of `python -m kvapp`."""

    def add(name: str, command: Command, summary: str, description: str) -> OneLineParser:
        parser = commands.add_parser(name, help=summary, description=description)
        parser.set_defaults(func=lambda args: run(command, args))
        return parser

    parser = add(
        "backup",
        backup,
        "copy the live SQLite database into FILE, consistently",
        "Copy the SQLite database, while it serves, into FILE through SQLite's online backup"
        " API: one consistent snapshot, with every write committed before the backup began."
        f" FILE appears only when complete. {DESTINATION_RULE}",
    )
    parser.add_argument("file", metavar="FILE", help="the backup file to write")
    parser.add_argument("--database", metavar="PATH", help=DATABASE_HELP)
    parser.add_argument("--force", action="store_true", help=FORCE_HELP)

    parser = add(
        "export",
        export,
        "write every live key to FILE as JSON Lines",
        "Write every live key, with its value, content type, revision and expiry, to FILE in"
        " kvapp's export format (JSON Lines, version 1; see kvapp/tools/exportformat.py)."
        f" FILE appears only when complete; - writes to stdout. {DESTINATION_RULE}",
    )
    parser.add_argument("file", metavar="FILE", help="the export file to write, or - for stdout")
    parser.add_argument("--database", metavar="URL", help=DATABASE_HELP)
    parser.add_argument("--force", action="store_true", help=FORCE_HELP)

    parser = add(
        "import",
        import_,
        "load an export file into the database",
        "Check the whole export FILE (- reads stdin), then load it in transactions of"
        f" {transfer.PAGE} records. A bad line fails the import before anything is written."
        " A new SQLite file appears only when complete; into an existing empty database a"
        f" failed import deletes what it loaded. {DESTINATION_RULE}",
    )
    parser.add_argument("file", metavar="FILE", help="the export file to read, or - for stdin")
    parser.add_argument("--database", metavar="URL", help=DATABASE_HELP)
    parser.add_argument(
        "--merge",
        action="store_true",
        help="import into a database that already holds keys (keys in both are replaced);"
        " also finishes an import that stopped part-way",
    )

    parser = add(
        "copy",
        copy,
        "copy every live key from one database to another",
        "Copy every live key from one database to another: SQLite file paths or postgresql://"
        f" URLs, in transactions of {transfer.PAGE} records. A new SQLite file appears only"
        f" when complete. {DESTINATION_RULE}",
    )
    parser.add_argument("--from", dest="source", metavar="URL", required=True, help="source")
    parser.add_argument("--to", dest="target", metavar="URL", required=True, help="destination")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="copy into a database that already holds keys (keys in both are replaced);"
        " also finishes a copy that stopped part-way",
    )

    parser = add(
        "check",
        check,
        "check the SQLite database fully: exit 0 when sound",
        "Run PRAGMA integrity_check (every page) and kvapp's schema checks on the SQLite"
        " database. Exit 0 when both pass; else 1, with the first problem on one line.",
    )
    parser.add_argument("--database", metavar="PATH", help=DATABASE_HELP)

    parser = add(
        "stats",
        stats,
        "show keys, sizes and revision of the SQLite database",
        "Show the live keys, keys with a TTL, expired rows not yet swept, bytes of keys and"
        " values, file and WAL sizes, schema version and revision, all from one snapshot.",
    )
    parser.add_argument("--database", metavar="PATH", help=DATABASE_HELP)
    parser.add_argument("--json", action="store_true", help="one JSON object instead of lines")


def run(command: Command, args: argparse.Namespace) -> int:
    """Run one command; return its exit status, with any failure told in one line."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    tally = transfer.Tally()
    status = 1
    try:
        # Every location named on the command line is checked before any
        # command opens, reads or creates anything: a URL kvapp cannot use
        # must not turn into a file of that name, nor fail only half-way.
        for name in ("database", "source", "target"):
            if getattr(args, name, None) is not None:
                setattr(args, name, targets.location(getattr(args, name)))
        return command(args, load_config(args.config), tally)
    except KeyboardInterrupt:
        reason, status = "interrupted by SIGINT", 128 + signal.SIGINT
    except Interrupted as exc:
        reason, status = str(exc), 128 + exc.signum
    except BrokenPipeError:
        # Further writes to stdout (at exit, too) would fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        reason = "the output pipe was closed before the export ended"
    except (
        ConfigError,
        DatabaseUnusable,
        StorageError,
        targets.StoreError,
        sqlitefile.NotUsable,
        exportformat.FormatError,
    ) as exc:
        reason = str(exc)
        if isinstance(exc, exportformat.FormatError):
            reason += "; nothing was imported"
    except atomicfile.DestinationExists as exc:
        reason = f"{exc.filename} already exists; give --force to replace it"
    except OSError as exc:
        reason = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
    except Exception as exc:  # the tools' one catch-all: one line, not a traceback
        reason = f"unexpected {type(exc).__name__}: {exc}"
    if tally.records:
        reason += (
            f"; the destination holds the first {tally.records} records (through key"
            f" {tally.last_key!r}): run the same command with --merge to finish"
        )
    lines = reason.splitlines()
    print(f"kvapp {args.command}: {lines[0] if lines else reason}", file=sys.stderr)
    return status
