"""Power cuts while kvapp makes its own files, on the filesystem that forgets (tests/powercut.py).

test_powercut.py pulls the plug under a server's writes to its database.  Here it
is pulled while kvapp makes the other files it promises to make whole:

- the data tools' destinations (test_tool_destination): `backup`, `export`, `import`
  and `copy` run as subprocesses from a source outside the mount into a destination
  on it; the plug is pulled at a random moment, the tool killed, the disk mounted
  again.  A new FILE or SQLite file must then be absent or complete, an existing one
  the old file or the complete new one.  An existing database that `import --merge`
  or `copy --merge` writes into must hold its old keys plus whole transactions of
  the new ones, in key order, and the same command run again must finish it.  A run
  that had finished before the cut must have left the complete new destination, and
  what a killed run left beside it must be gone after the next run.
- a new database's folders (test_new_database_folders): kvapp creates the missing
  folders of a database path; a write acknowledged there, or a tool's finished new
  destination there, must survive the cut with its folders.
- the -gen and metrics files (test_gen_and_metrics_after_cuts, test_damaged_gen_file):
  after cuts under writes with the read cache warm in two worker processes, the
  restarted server answers every key exactly as the database holds it and /metrics
  answers 200; a -gen file left empty, short or full of garbage changes no answer and
  stops no write; one of another size stops the server with one line that says what
  to do.

POWERCUT_SEED repeats a run; every test prints its seed and its figures (pytest -s).
"""

from __future__ import annotations

import http.client
import os
import random
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from bulk import fill
from helpers import ROOT, KvappServer, Server
from powerkit import VARIANTS, Disk, needs_fuse
from tools import kvapp, kvapp_command, kvapp_environ, one_line_error, rows
from workerkit import one_client_per_worker, workers_of

from kvapp.store.base import Record
from kvapp.store.readcache import FILE_BYTES
from kvapp.store.sqlite import SQLiteStore
from kvapp.tools import sqlitefile, transfer
from kvapp.tools.atomicfile import fsync_file

pytestmark = [pytest.mark.slow, needs_fuse]

RECORDS = 40_000  # the source: enough that each tool runs for a good fraction of a second
OLD_RECORDS = 600  # the older, smaller content of a destination that existed
TOOLS = ("backup", "export", "import", "copy")
DESTINATION = {
    "backup": "kv-backup.sqlite3",
    "export": "kv.jsonl",
    "import": "imported.sqlite3",
    "copy": "copied.sqlite3",
}
QUIET = {"KVAPP_ACCESS_LOG": "false"}


class Seeded(random.Random):
    """A random generator that remembers its seed, to print."""

    def __init__(self, number: int) -> None:
        super().__init__(number)
        self.number = number


@pytest.fixture
def rng(request) -> Seeded:
    seed = int(os.environ.get("POWERCUT_SEED", random.randrange(2**32)))
    print(f"\n[{request.node.name}] seed {seed}")
    return Seeded(seed)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    disk = Disk(tmp_path / "disk", tmp_path / "mnt", tmp_path / "powercut.log").mount()
    try:
        yield disk
    finally:
        disk.close()


def remount(disk: Disk) -> None:
    disk.unmount()
    disk.mount()


# -- durable set-up on the mount -------------------------------------------------------------


def new_folder(path: Path) -> Path:
    """Make a folder on the mount that a cut keeps."""
    path.mkdir()
    fsync_file(path)
    fsync_file(path.parent)
    return path


def put_durably(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    fsync_file(path)
    fsync_file(path.parent)


# -- the sources, outside the mount ----------------------------------------------------------


def records(count: int, tag: str, step: int = 1, revision: int = 1) -> Iterator[Record]:
    """Yield count varied records in key order: text and binary values of many sizes."""
    for n in range(count):
        i = n * step
        key = f"key-{i:07d}" + ("-\u00e9" if i % 11 == 0 else "")
        if i % 7 == 0:
            value = b"\xff\x00" + tag.encode() + i.to_bytes(4, "big")
            content_type = "application/octet-stream"
        else:
            value = f"{tag} {i} ".encode() + b"x" * (i * 37 % 300)
            content_type = "text/plain; charset=utf-8"
        yield Record(key, value, content_type, revision + n, None)


@dataclass(frozen=True)
class Sources:
    database: Path  # RECORDS records
    export: Path  # its export file
    rows: list  # its rows, as tools.rows reads them
    export_bytes: bytes
    old_database: Path  # the older content of a destination that existed: a database
    old_export: Path  # ... and its export
    old_rows: list
    old_database_bytes: bytes
    old_export_bytes: bytes


def exported(database: Path, out: Path) -> bytes:
    store = SQLiteStore(str(database), startup_check_max_bytes=0)
    try:
        with open(out, "wb") as handle:
            transfer.export(store, handle)
    finally:
        store.close()
    return out.read_bytes()


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Sources:
    folder = tmp_path_factory.mktemp("sources")
    database, old = folder / "source.sqlite3", folder / "old.sqlite3"
    fill(database, records(RECORDS, "new"))
    # Keys every 97th of the new ones, with other values, and keys of their own.
    old_records = [
        *records(OLD_RECORDS // 2, "old", step=97, revision=RECORDS + 1),
        *(
            Record(f"old-{i:05d}", f"old {i}".encode(), "text/plain", 1, None)
            for i in range(OLD_RECORDS // 2)
        ),
    ]
    fill(old, iter(old_records))
    export, old_export = folder / "source.jsonl", folder / "old.jsonl"
    export_bytes, old_export_bytes = exported(database, export), exported(old, old_export)
    for path in (database, old):
        assert not Path(f"{path}-wal").exists()  # closed cleanly: the file alone is the database
    return Sources(
        database,
        export,
        rows(database),
        export_bytes,
        old,
        old_export,
        rows(old),
        old.read_bytes(),
        old_export_bytes,
    )


# -- 1. the data tools' destinations ---------------------------------------------------------


def tool_argv(tool: str, sources: Sources, dest: Path, existed: bool) -> list[str]:
    """Return the arguments that write sources' content to dest (existed: over what is there)."""
    if tool == "backup":
        return ["backup", "--database", str(sources.database), str(dest), *["--force"] * existed]
    if tool == "export":
        return ["export", "--database", str(sources.database), str(dest), *["--force"] * existed]
    if tool == "import":
        return ["import", "--database", str(dest), str(sources.export), *["--merge"] * existed]
    return ["copy", "--from", str(sources.database), "--to", str(dest), *["--merge"] * existed]


def old_content(tool: str, sources: Sources) -> bytes:
    return sources.old_export_bytes if tool == "export" else sources.old_database_bytes


def outcome(tool: str, sources: Sources, dest: Path, existed: bool) -> str:
    """Return what a cut left at dest: absent, old, new or part; fail on anything else."""
    if not os.path.lexists(dest):
        assert not existed, "the destination that existed is gone"
        return "absent"
    data = dest.read_bytes()
    if existed and tool in ("backup", "export") and data == old_content(tool, sources):
        return "old"
    if tool == "export":
        assert data == sources.export_bytes, f"an export of {len(data)} bytes is neither"
        return "new"
    assert sqlitefile.check(dest) == []
    found = rows(dest)
    if existed and tool in ("import", "copy"):
        return merged(found, sources)
    assert found == sources.rows, f"{len(found)} rows, not the {len(sources.rows)} of the source"
    return "new"


def merged(found: list, sources: Sources) -> str:
    """Check that found is the old rows plus whole transactions of the new ones, in key order.

    A merge gives loaded rows revisions above the old ones (kvapp.tools.transfer),
    so rows are compared without theirs, and those are checked apart.
    """
    have = {row[0]: row[:3] + row[4:] for row in found}
    new = [row[:3] + row[4:] for row in sources.rows]
    loaded = 0
    while loaded < len(new) and have.get(new[loaded][0]) == new[loaded]:
        loaded += 1
    old = {row[0]: row[:3] + row[4:] for row in sources.old_rows}
    expected = old | {row[0]: row for row in new[:loaded]}
    assert have == expected, f"not the old rows plus the first {loaded} new ones"
    above = max(row[3] for row in sources.old_rows)
    revisions = {row[0]: row[3] for row in found}
    assert all(revisions[row[0]] > above for row in new[:loaded] if row != old.get(row[0]))
    whole = loaded % transfer.PAGE == 0 or loaded == len(new)
    assert whole, f"{loaded} new rows: a transaction of {transfer.PAGE} in part"
    return "old" if loaded == 0 else "new" if loaded == len(new) else "part"


def leftovers(dest: Path) -> list[str]:
    """Return the temporary files that killed runs writing dest left beside it."""
    return sorted(path.name for path in dest.parent.glob(f".{dest.name}.tmp-*"))


def run_tool(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        kvapp_command(*argv),
        cwd=ROOT,
        env=kvapp_environ(),
        capture_output=True,
        timeout=timeout,
    )


def run_and_cut(
    disk: Disk, argv: list[str], folder: Path, delay: float | None, variant: str, seed: int
) -> tuple[bool, float]:
    """Run the tool, pull the plug delay seconds after its first file appeared in folder
    (None: once it finished), kill it, and mount the disk again on what it kept.

    Return whether the tool had finished, successfully, before the cut, and how long it
    had been writing (from its first file in folder to its end or the cut).
    """
    before = set(os.listdir(folder))
    proc = subprocess.Popen(
        kvapp_command(*argv),
        cwd=ROOT,
        env=kvapp_environ(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # The tool's first 0.2 s are Python starting: the moments count from its first
        # file (a tool that makes none before its end, as an export on a filesystem with
        # O_TMPFILE would, is cut only once it finished).
        while proc.poll() is None and set(os.listdir(folder)) <= before:
            time.sleep(0.002)
        writing = time.monotonic()
        try:
            proc.wait(timeout=120 if delay is None else delay)
        except subprocess.TimeoutExpired:
            pass
        wrote = time.monotonic() - writing
        finished = proc.poll() is not None
        disk.pull(variant, seed)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=60)
    if finished:
        assert proc.returncode == 0, f"{argv[0]} failed before the cut: {err.decode()}"
    remount(disk)
    return finished, wrote


@pytest.mark.parametrize("tool", TOOLS)
def test_tool_destination(tool: str, sources: Sources, disk: Disk, rng: Seeded):
    outcomes: Counter[str] = Counter()
    figures = Counter()
    for existed in (False, True):
        case = "existed" if existed else "new"
        # First a run that finishes, then the cut: the finished destination must be whole.
        # How long it wrote sets the moments of the cuts that follow: up to its end.
        duration = 0.0
        ran_again = False
        for number, variant in enumerate(("drop", *VARIANTS)):
            folder = new_folder(disk.mountpoint / f"{case}-{number}")
            dest = folder / DESTINATION[tool]
            if existed:
                put_durably(dest, old_content(tool, sources))
            delay = None if number == 0 else rng.uniform(0.0, 0.9) * duration
            seed = rng.randrange(2**32)
            argv = tool_argv(tool, sources, dest, existed)
            finished, wrote = run_and_cut(disk, argv, folder, delay, variant, seed)
            if number == 0:
                duration = wrote
            where = f"{tool} into a {case} destination, cut {number} ({variant} {seed}"
            where += f" after {wrote:.2f} s of writing, seed {rng.number})"
            found = outcome(tool, sources, dest, existed)
            if finished:
                assert found == "new", f"{where}: finished, but the destination is {found}"
            outcomes[f"{case} {'finished' if finished else 'cut'} -> {found}"] += 1
            figures["cuts"] += 1
            left = leftovers(dest)
            figures["left temporary files beside it"] += bool(left)
            if (left or found == "part") and not ran_again:
                # The same command again (over what is there now) finishes the work
                # and removes what the killed run left beside the destination; once
                # per case, for time.
                ran_again = True
                figures["ran again"] += 1
                again = tool_argv(tool, sources, dest, existed or os.path.lexists(dest))
                result = run_tool(again)
                assert result.returncode == 0, f"{where}: run again: {result.stderr.decode()}"
                assert outcome(tool, sources, dest, existed) == "new", where
                assert leftovers(dest) == [], f"{where}: still beside it after a run: {left}"
        figures[f"{case}: seconds of writing"] = round(duration, 2)
    print(f"[powercut {tool}] seed {rng.number}: {dict(figures)}; outcomes {dict(outcomes)}")


# -- 2. a new database in new folders --------------------------------------------------------


def put(port: int, key: str, value: bytes) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("PUT", f"/kv/{key}", body=value)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


@pytest.mark.parametrize("how", ["serve", "import", "copy"])
def test_new_database_folders(how: str, sources: Sources, disk: Disk, tmp_path: Path):
    database = disk.mountpoint / "new" / "deeper" / "kv.sqlite3"
    if how == "serve":
        server = Server(database, QUIET, log_path=tmp_path / "server.log").start()
        try:
            assert put(server.port, "acknowledged", b"before the cut") == 201
            disk.pull("drop")
        finally:
            server.kill()
    else:
        if how == "import":
            argv = ["import", "--database", str(database), str(sources.old_export)]
        else:
            argv = ["copy", "--from", str(sources.old_database), "--to", str(database)]
        result = run_tool(argv)
        assert result.returncode == 0, result.stderr.decode()
        disk.pull("drop")
    remount(disk)
    survived = sorted(str(path.relative_to(disk.mountpoint)) for path in disk.mountpoint.rglob("*"))
    assert database.exists(), f"after the cut only {survived} are left"
    assert sqlitefile.check(database) == []
    if how == "serve":
        assert [row[:2] for row in rows(database)] == [("acknowledged", b"before the cut")]
    else:
        assert rows(database) == sources.old_rows


# -- 3. the -gen and metrics files -----------------------------------------------------------


@dataclass
class Ledger:
    """The values sent for each key, in order, and the index of the last acknowledged one."""

    sent: dict[str, list[bytes]] = field(default_factory=dict)
    acknowledged: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, key: str, value: bytes) -> int:
        with self.lock:
            values = self.sent.setdefault(key, [])
            values.append(value)
            return len(values) - 1

    def acknowledge(self, key: str, index: int) -> None:
        with self.lock:
            self.acknowledged[key] = index


def in_database(database: Path) -> dict[str, tuple[bytes, str]]:
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        return {
            key: (value, content_type)
            for key, value, content_type in conn.execute("SELECT key, value, content_type FROM kv")
        }
    finally:
        conn.close()


@contextmanager
def serving(database: Path, log: Path, workers: int = 2) -> Iterator[KvappServer]:
    """Run `python -m kvapp serve --workers 2` on database; SIGKILL it and its workers after."""
    server = KvappServer(database, QUIET, args=("--workers", str(workers)), log_path=log)
    server.start()
    try:
        workers_of(server, workers)
        yield server
    finally:
        server.kill()


def check_answers(server: KvappServer, database: Path, ledger: Ledger, where: str) -> int:
    """Check that each worker answers every key as the database holds it; return the keys."""
    stored = in_database(database)
    for key, index in ledger.acknowledged.items():
        assert key in stored, f"{where}: acknowledged {key} is lost"
        assert ledger.sent[key].index(stored[key][0]) >= index, f"{where}: {key} went back"
    with one_client_per_worker(server.port, workers_of(server, 2)) as clients:
        for client in clients.values():
            for key in sorted(ledger.sent):
                client.conn.request("GET", f"/kv/{key}")
                response = client.conn.getresponse()
                body = response.read()
                if key in stored:
                    assert (response.status, body) == (200, stored[key][0]), f"{where}: {key}"
                    assert response.getheader("Content-Type") == stored[key][1], where
                else:
                    assert response.status == 404, f"{where}: {key} is not in the database"
            client.conn.request("GET", "/metrics")
            response = client.conn.getresponse()
            assert response.status == 200 and b"kvapp_keys" in response.read(), where
    return len(stored)


def write_and_read(
    server: KvappServer, ledger: Ledger, tag: str, stop: threading.Event, limit: int = 10**9
) -> None:
    """PUT new values of a few keys until stopped (or limit writes); after each
    acknowledgement every worker must read it back, which keeps both read caches warm."""
    writer = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        with one_client_per_worker(server.port, workers_of(server, 2)) as clients:
            n = 0
            while not stop.is_set() and n < limit:
                key = "k" if n % 2 == 0 else f"k{n % 7}"
                value = f"{tag}.{n}.".encode() + b"v" * (n * 97 % 3000)
                index = ledger.send(key, value)
                writer.request("PUT", f"/kv/{key}", body=value)
                response = writer.getresponse()
                response.read()
                assert response.status in (201, 204), response.status
                ledger.acknowledge(key, index)
                for client in clients.values():
                    assert client.request(f"/kv/{key}") == (200, value)
                n += 1
    except (OSError, http.client.HTTPException):
        if not stop.is_set():
            raise
        # The power went: the outcome of the last request is unknown.
    finally:
        writer.close()


def cut_under_writes(
    disk: Disk, server: KvappServer, ledger: Ledger, tag: str, variant: str, rng: Seeded
) -> None:
    """Write and read for a random while, pull the plug, kill the server, mount again."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            write_and_read(server, ledger, tag, stop)
        except BaseException as exc:  # an assertion in the thread fails the test
            if not stop.is_set():
                errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(rng.uniform(0.2, 0.8))
    stop.set()
    disk.pull(variant, rng.randrange(2**32))
    server.kill()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert not errors, errors[0]
    remount(disk)


def test_gen_and_metrics_after_cuts(disk: Disk, rng: Seeded, tmp_path: Path):
    database = disk.mountpoint / "kv.sqlite3"
    ledger = Ledger()
    figures = Counter()
    for round_no, variant in enumerate([*VARIANTS, *VARIANTS]):
        where = f"round {round_no} ({variant}, seed {rng.number})"
        with serving(database, tmp_path / f"server-{round_no}.log") as server:
            figures["keys checked"] += check_answers(server, database, ledger, where)
            cut_under_writes(disk, server, ledger, f"r{round_no}", variant, rng)
        figures["cuts"] += 1
    with serving(database, tmp_path / "server-last.log") as server:
        figures["keys checked"] += check_answers(server, database, ledger, "after the last cut")
    figures["writes acknowledged"] = sum(len(values) for values in ledger.sent.values())
    print(f"[powercut -gen] seed {rng.number}: {dict(figures)}")


# What a -gen file may hold after a cut or damage: none of it may change an answer.
GEN_DAMAGE = {
    "empty": lambda rng: b"",
    "short": lambda rng: rng.randbytes(FILE_BYTES // 3 + 5),  # not even whole counters
    "garbage": lambda rng: rng.randbytes(FILE_BYTES),
    "all ones": lambda rng: b"\xff" * FILE_BYTES,  # every counter at its largest value
}


def test_damaged_gen_file(disk: Disk, rng: Seeded, tmp_path: Path):
    database = disk.mountpoint / "kv.sqlite3"
    gen = Path(f"{database}-gen")
    ledger = Ledger()
    for number, (damage, make) in enumerate(GEN_DAMAGE.items()):
        where = f"-gen {damage} (seed {rng.number})"
        with serving(database, tmp_path / f"server-{damage}.log") as server:
            check_answers(server, database, ledger, where)
            cut_under_writes(disk, server, ledger, damage, VARIANTS[number % 3], rng)
        put_durably(gen, make(rng))
        with serving(database, tmp_path / f"server-{damage}-after.log") as server:
            check_answers(server, database, ledger, f"{where}, before writes")
            # Writes work, and every worker reads each one back at once.
            write_and_read(server, ledger, f"{damage}-after", threading.Event(), limit=20)
            assert ledger.acknowledged.get("k", -1) == len(ledger.sent["k"]) - 1, where
    # A -gen file of another size is another kvapp's: the server refuses to start, in one line
    # that names the file and the remedy, and starts once that remedy is applied.
    put_durably(gen, rng.randbytes(FILE_BYTES + 4096))
    result = kvapp("serve", "--port", "0", "--database", str(database), env=QUIET, timeout=60)
    line = one_line_error(result)
    assert str(gen) in line and "delete" in line, line
    gen.unlink()
    with serving(database, tmp_path / "server-last.log") as server:
        check_answers(server, database, ledger, "after the -gen file was deleted")
    acknowledged = sum(len(values) for values in ledger.sent.values())
    print(f"[powercut -gen damaged] seed {rng.number}: {list(GEN_DAMAGE)} after cuts,")
    print(f"  {acknowledged} writes acknowledged; a longer file refused: {line.strip()}")
