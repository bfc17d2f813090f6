"""Storage faults made to happen for real against a running kvapp.

Issue 2 fixes the answers: disk full -> 507; locked past the busy timeout, an
I/O error, or a database file that cannot be written -> 503 with Retry-After.
In every case the body names the problem in one line, nothing of the refused
request is stored, the server stays up, reads keep working, and writes work
again as soon as the cause is gone, without a restart.  A database that is
read-only or damaged when kvapp starts is refused with one line naming it, and
damage that appears while serving never yields a wrong answer here.

The crash rounds (kill -9 under concurrent writes) are in test_crash.py.
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from faultkit import (
    NO_DAC,
    Client,
    build_database,
    needs_root,
    overwrite,
    pages_of,
    require_tool,
    run_entry_point,
)
from helpers import ROOT, curl, free_port, server_environ

pytestmark = pytest.mark.slow

FULL_BODY = b"the disk is full: nothing was stored; free space and retry\n"
LOCKED_BODY = b"the database is locked by another process: nothing was stored; retry\n"
IO_ERROR_BODY = b"the database had an I/O error: nothing was stored; retry\n"


def assert_one_line_answer(answer, status: int, body: bytes) -> None:
    """Assert status, exact body, plain text and, for 503, a Retry-After."""
    got_status, headers, got_body = answer
    assert (got_status, got_body) == (status, body)
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert int(headers["content-length"]) == len(got_body)
    if status == 503:
        assert int(headers["retry-after"]) >= 1


def integrity(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


# -- disk full ---------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 2 MiB tmpfs: a real filesystem that fills up; unmounted at teardown."""
    require_tool("mount")
    mountpoint = tmp_path / "small-disk"
    mountpoint.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(mountpoint)],
        check=True,
        capture_output=True,
    )
    yield mountpoint
    subprocess.run(["umount", "--lazy", str(mountpoint)], check=True)


@needs_root
def test_disk_full_answers_507_keeps_every_acknowledged_write_and_recovers(
    small_disk, server_factory, summary
):
    # WAL mode appends about two 4 KiB pages per commit and only checkpoints
    # at 1000 pages (about 4 MiB), so on this 2 MiB filesystem it is the WAL
    # that meets ENOSPC, after a few hundred small writes.  The ballast is
    # space we can give back while the server runs.
    db = small_disk / "kv.sqlite3"
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\0" * 256 * 1024)
    server = server_factory(path=db)
    client = Client(server.port)

    acknowledged: dict[str, str] = {}
    refused: list[str] = []  # keys of refused requests
    for n in range(5000):
        key, value = f"key{n}", f"value{n}-" + "v" * 100
        answer = client.get(f"/set?{key}={value}")
        if answer[0] != 200:
            assert_one_line_answer(answer, 507, FULL_BODY)
            refused.append(key)
            break
        acknowledged[key] = value
    assert refused, "the filesystem never filled up"

    # Still full: more writes are refused, each one completely; the server stays up.
    for n in range(3):
        key = f"refused{n}"
        assert_one_line_answer(client.get(f"/set?{key}=x&other{n}=y"), 507, FULL_BODY)
        refused += [key, f"other{n}"]

    # Reads keep working while the disk is full.
    for key, value in acknowledged.items():
        assert client.get(f"/get?key={key}")[::2] == (200, value.encode())
    for key in refused:
        assert client.get(f"/get?key={key}")[0] == 404

    # Free space: the very next write succeeds, without a restart.
    ballast.unlink()
    assert client.get("/set?after=free")[::2] == (200, b"stored 1 key\n")
    acknowledged["after"] = "free"

    # Everything acknowledged survives a restart on the same filesystem.
    client.close()
    server.stop()
    assert integrity(db) == "ok"
    server = server_factory(path=db)
    client = Client(server.port)
    for key, value in acknowledged.items():
        assert client.get(f"/get?key={key}")[::2] == (200, value.encode())
    for key in refused:
        assert client.get(f"/get?key={key}")[0] == 404
    client.close()
    summary(
        f"[faults] disk full (2 MiB tmpfs): {len(acknowledged) - 1} writes acknowledged"
        " before the first 507; 4 writes refused with 507 and not stored; reads 200 while"
        f" full; 200 right after freeing space; {len(acknowledged)} of {len(acknowledged)}"
        " acknowledged readable after a restart"
    )


def test_disk_full_in_process_via_max_page_count(app, client):
    # Without root there is no small filesystem to fill; SQLite's own size cap
    # raises the same SQLITE_FULL.  It is a setting of the writer connection,
    # so the test reaches for it (fault injection, nothing else uses it).
    client.get("/set?before=1")
    writer = app.repository._writer
    pages = writer.execute("PRAGMA page_count").fetchone()[0]
    writer.execute(f"PRAGMA max_page_count = {pages + 2}")
    stored = {"before": "1"}
    for n in range(1000):
        answer = client.get(f"/set?key{n}={'v' * 2000}", expect_errors=True)
        if answer.status_int != 200:
            assert answer.status_int == 507
            assert answer.body == FULL_BODY
            assert answer.content_type == "text/plain"
            break
        stored[f"key{n}"] = "v" * 2000
    else:
        pytest.fail("the database never filled up")
    assert client.get(f"/get?key=key{n}", expect_errors=True).status_int == 404
    for key, value in stored.items():
        assert client.get(f"/get?key={key}").body == value.encode()
    writer.execute("PRAGMA max_page_count = 1073741823")
    assert client.get(f"/set?key{n}=again").body == b"stored 1 key\n"
    assert client.get(f"/get?key=key{n}").body == b"again"


# -- read-only database, folder or filesystem --------------------------------
#
# Decision: kvapp does not start on a database it cannot write.  SQLite would
# open it read-only and create its -shm file with the database's mode; that
# read-only -shm keeps the database read-only even after the file is fixed
# (and an open connection never turns writable), so a read-only start would be
# a trap.  kvapp refuses with one line instead, before SQLite touches anything.
# While kvapp runs, a chmod does not reach its open file descriptors (writes go
# on) and the kernel refuses a read-only remount while files are open for
# writing; what can happen is the file being renamed or deleted: tested below.


def make_read_only(target: Path, how: str) -> tuple[tuple[str, ...], Callable[[], object]]:
    """Make a file or folder read-only; return (prefix to run kvapp with, undo).

    A mode binds a process without DAC override (see NO_DAC); a read-only
    bind mount binds even root.
    """
    if how.startswith("mode"):
        require_tool("setpriv")
        old = target.stat().st_mode & 0o777
        target.chmod(int(how.split()[1], 8))
        return NO_DAC, lambda: target.chmod(old)
    require_tool("mount")
    subprocess.run(["mount", "--bind", str(target), str(target)], check=True)
    subprocess.run(["mount", "-o", "remount,ro,bind", str(target)], check=True)
    return (), lambda: subprocess.run(["umount", "--lazy", str(target)], check=True)


def assert_refused(result, line: str) -> None:
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [line]


@needs_root
@pytest.mark.parametrize("how", ["mode 0444", "read-only bind mount"])
@pytest.mark.parametrize("command", ["waitress-serve", "python -m kvapp"])
def test_read_only_file_is_refused_at_startup_with_one_line(db_path, how, command):
    build_database(db_path, count=3)
    before = db_path.read_bytes()
    files = sorted(p.name for p in db_path.parent.iterdir())
    assert f"{db_path.name}-shm" not in files
    prefix, undo = make_read_only(db_path, how)
    try:
        result = run_entry_point(command, db_path, free_port(), prefix)
    finally:
        undo()
    assert_refused(
        result,
        f"kvapp: cannot use database {db_path}: it is read-only;"
        " make it writable for the user running kvapp",
    )
    # Refused before SQLite opened it: no -shm with a read-only mode left behind.
    assert sorted(p.name for p in db_path.parent.iterdir()) == files
    assert db_path.read_bytes() == before


@needs_root
@pytest.mark.parametrize("how", ["mode 0555", "read-only bind mount"])
@pytest.mark.parametrize("command", ["waitress-serve", "python -m kvapp"])
def test_read_only_folder_is_refused_at_startup_with_one_line(db_path, how, command):
    # A WAL database can only be read with its -shm and -wal files beside it.
    # After a clean shutdown they are gone, and a read-only folder cannot get
    # them back, so kvapp cannot even read: it refuses, naming the folder.
    build_database(db_path, count=3)
    before = db_path.read_bytes()
    prefix, undo = make_read_only(db_path.parent, how)
    try:
        result = run_entry_point(command, db_path, free_port(), prefix)
    finally:
        undo()
    if how == "mode 0555":
        problem = (
            f"its folder {db_path.parent} is read-only and SQLite must create"
            f" {db_path.name}-wal and {db_path.name}-shm there; make the folder writable"
        )
    else:
        problem = (
            f"its folder {db_path.parent} is on a read-only filesystem;"
            " remount it read-write or choose another database path"
        )
    assert_refused(result, f"kvapp: cannot use database {db_path}: {problem}")
    assert db_path.read_bytes() == before


@needs_root
def test_read_only_shm_left_by_another_program_is_named(db_path, server_factory):
    server = server_factory()
    assert curl(f"{server.url}/set?a=1")[0] == 200
    server.kill()  # leaves -wal and -shm behind
    shm = Path(f"{db_path}-shm")
    prefix, undo = make_read_only(shm, "mode 0444")
    try:
        result = run_entry_point("waitress-serve", db_path, free_port(), prefix)
    finally:
        undo()
    assert_refused(
        result,
        f"kvapp: cannot use database {db_path}: {shm} is read-only;"
        " make it writable for the user running kvapp",
    )


@needs_root
def test_read_only_folder_with_leftover_wal_keeps_serving(db_path, server_factory):
    # After kill -9 the -wal and -shm files stay; then a read-only folder
    # takes nothing away: SQLite creates no file, so reads and writes work.
    server = server_factory()
    assert curl(f"{server.url}/set?a=1")[0] == 200
    server.kill()
    assert Path(f"{db_path}-wal").exists() and Path(f"{db_path}-shm").exists()
    prefix, undo = make_read_only(db_path.parent, "mode 0555")
    try:
        server = server_factory(prefix=prefix)
        assert curl(f"{server.url}/get?key=a")[::2] == (200, b"1")
        assert curl(f"{server.url}/set?b=2")[::2] == (200, b"stored 1 key\n")
        assert curl(f"{server.url}/get?key=b")[::2] == (200, b"2")
        server.kill()
    finally:
        undo()


@pytest.mark.parametrize("how", ["renamed", "deleted"])
def test_database_moved_or_deleted_while_serving_answers_503_then_recovers(
    db_path, server_factory, how, summary
):
    # In WAL mode SQLite goes on committing after its file is renamed or
    # unlinked (into a WAL that no longer belongs to the file at the path), so
    # kvapp checks the file's identity on every write.
    server = server_factory()
    client = Client(server.port)
    assert client.get("/set?a=1")[0] == 200
    assert client.get("/get?key=a")[::2] == (200, b"1")
    kept = db_path.with_name("kept.sqlite3")
    os.link(db_path, kept)  # "deleted": the test keeps a hard link to restore it
    db_path.unlink()
    try:
        if how == "renamed":
            os.link(kept, db_path.with_name("renamed.sqlite3"))
        answer = client.get("/set?a=2&b=2")
        assert_one_line_answer(
            answer,
            503,
            b"the database file was moved or deleted: nothing was stored; put it back\n",
        )
        # Reads: a thread that had opened the file still reads it; a thread
        # that had not gets 503 (kvapp opens with mode=rw).  Never a 404 from a
        # new, empty database created in its place.
        seen = set()
        for _ in range(8):
            reader = Client(server.port)
            seen.add(reader.get("/get?key=a")[::2])
            reader.close()
        moved = b"the database file was moved or deleted; put it back\n"
        assert seen <= {(200, b"1"), (503, moved)}
        assert not db_path.exists()
    finally:
        os.link(kept, db_path)
    assert client.get("/set?a=3")[::2] == (200, b"stored 1 key\n")
    assert client.get("/get?key=a")[::2] == (200, b"3")
    assert client.get("/get?key=b")[0] == 404
    client.close()
    summary(
        f"[faults] database {how} while serving: writes {answer[0]},"
        f" reads {sorted(status for status, _ in seen)}, put back: 200"
    )


# -- locked by another process -----------------------------------------------

HOLD_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute(sys.argv[2])
conn.execute("INSERT INTO kv (key, value, content_type, revision) VALUES ('held', 'x', 't', 0)")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
print("released", flush=True)
"""


@pytest.mark.parametrize("begin", ["BEGIN EXCLUSIVE", "BEGIN IMMEDIATE"])
def test_locked_database_answers_503_then_recovers(db_path, server_factory, begin, summary):
    busy_ms = 400
    server = server_factory(env={"KVAPP_BUSY_TIMEOUT_MS": str(busy_ms)})
    client = Client(server.port)
    assert client.get("/set?before=1")[0] == 200

    with subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(db_path), begin],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        assert holder.stdout.readline() == "locked\n"
        try:
            started = time.monotonic()
            answer = client.get("/set?refused=1&before=2")
            waited = time.monotonic() - started
            assert_one_line_answer(answer, 503, LOCKED_BODY)
            # It waited for the lock (the busy timeout), and then answered.
            assert waited >= busy_ms / 1000

            # Several writers at once: each gets its own 503; none hangs or fails otherwise.
            answers: list[int] = []

            def write(n: int) -> None:
                other = Client(server.port)
                answers.append(other.get(f"/set?parallel{n}=1")[0])
                other.close()

            threads = [threading.Thread(target=write, args=(n,)) for n in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=30)
            assert answers == [503, 503, 503]

            # In WAL mode EXCLUSIVE and IMMEDIATE both lock out writers only:
            # readers see the last commit (https://sqlite.org/lang_transaction.html).
            assert client.get("/get?key=before")[::2] == (200, b"1")
            assert client.get("/get?key=held")[0] == 404
        finally:
            holder.stdin.write("\n")
            holder.stdin.flush()
            assert holder.stdout.readline() == "released\n"

    assert client.get("/set?after=1")[::2] == (200, b"stored 1 key\n")
    assert client.get("/get?key=after")[::2] == (200, b"1")
    assert client.get("/get?key=before")[::2] == (200, b"1")
    for key in ("refused", "held", "parallel0", "parallel1", "parallel2"):
        assert client.get(f"/get?key={key}")[0] == 404
    client.close()
    summary(
        f"[faults] lock held by {begin}: writes 503 after {waited:.2f} s"
        f" (busy timeout {busy_ms} ms), reads 200, after release 200"
    )


# -- I/O error -----------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE via prlimit(2)")
def test_io_error_answers_503_then_recovers(db_path, server_factory, summary):
    # A real I/O error from the kernel: a file size limit set on the running
    # server makes the WAL's next write() fail with EFBIG, which SQLite reports
    # as SQLITE_IOERR_WRITE.  (Python ignores SIGXFSZ, so the server lives.)
    server = server_factory()
    client = Client(server.port)
    for n in range(5):
        assert client.get(f"/set?before{n}={'v' * 100}")[0] == 200
    limit = os.path.getsize(f"{db_path}-wal") + 4096
    _, hard = resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (limit, hard))
    try:
        answers = [client.get(f"/set?during{n}={'v' * 100}") for n in range(20)]
    finally:
        resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (hard, hard))
    refused = [n for n, answer in enumerate(answers) if answer[0] != 200]
    assert refused, "the size limit never caused an I/O error"
    for n, answer in enumerate(answers):
        if n in refused:
            assert_one_line_answer(answer, 503, IO_ERROR_BODY)
            assert client.get(f"/get?key=during{n}")[0] == 404
        else:
            assert client.get(f"/get?key=during{n}")[::2] == (200, b"v" * 100)
    for n in range(5):
        assert client.get(f"/get?key=before{n}")[::2] == (200, b"v" * 100)

    assert client.get("/set?after=1")[::2] == (200, b"stored 1 key\n")
    assert client.get("/get?key=after")[::2] == (200, b"1")
    client.close()
    server.stop()
    assert integrity(db_path) == "ok"
    # What was acknowledged is in the file, what was refused is not.
    conn = sqlite3.connect(db_path)
    stored = {key for (key,) in conn.execute("SELECT key FROM kv")}
    conn.close()
    assert stored == {f"before{n}" for n in range(5)} | {"after"} | {
        f"during{n}" for n in range(20) if n not in refused
    }
    summary(
        f"[faults] I/O error (RLIMIT_FSIZE): {len(refused)} of 20 writes 503,"
        " reads 200, after lifting the limit 200"
    )


# -- damaged database file -----------------------------------------------------


def damage(db: Path, kind: str) -> None:
    """Damage a healthy kvapp database file in place."""
    size = db.stat().st_size
    page = 4096
    if kind == "garbage":
        db.write_bytes(random.Random(1).randbytes(size))
    elif kind == "zeroed header":
        overwrite(db, 0, bytes(100))
    elif kind == "truncated mid-page":
        os.truncate(db, size - page // 2)
    elif kind == "truncated to whole pages":
        os.truncate(db, 2 * page)
    elif kind == "damaged page":
        # One leaf page of the kv table: the header is intact and the file
        # opens, only PRAGMA quick_check reads far enough to notice.
        leaf = pages_of(db, "kv", "leaf")[3]
        overwrite(db, (leaf - 1) * page, random.Random(2).randbytes(page))
    else:
        raise ValueError(kind)


DAMAGE_AT_STARTUP = [
    ("garbage", "it is not an SQLite database; move it away or restore a backup"),
    ("zeroed header", "it is not an SQLite database; move it away or restore a backup"),
    ("truncated mid-page", "it is truncated (not a whole number of pages)"),
    ("truncated to whole pages", "it is truncated ("),
    ("damaged page", "it is not a healthy SQLite database; move it away or restore a backup"),
]


@pytest.mark.parametrize(("kind", "says"), DAMAGE_AT_STARTUP)
@pytest.mark.parametrize("command", ["waitress-serve", "python -m kvapp"])
def test_damaged_database_is_refused_at_startup_with_one_line(db_path, kind, says, command):
    build_database(db_path)
    damage(db_path, kind)
    before = db_path.read_bytes()
    result = run_entry_point(command, db_path, free_port())
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"kvapp: cannot use database {db_path}: ")
    assert says in lines[0]
    assert db_path.read_bytes() == before  # refusing does not touch the file


def test_a_database_refused_at_startup_comes_back_by_the_documented_restore(
    db_path, server_factory, tmp_path
):
    """docs/data-tools.md "Backups and restore", steps 2 to 4, after a damaged file is refused."""
    items = build_database(db_path)
    backup = tmp_path / "backup.sqlite3"
    kvapp = [sys.executable, "-m", "kvapp"]
    env = {**server_environ(), "KVAPP_DATABASE": str(db_path)}
    subprocess.run([*kvapp, "backup", str(backup)], cwd=ROOT, env=env, check=True)
    damage(db_path, "damaged page")
    refused = run_entry_point("python -m kvapp", db_path, free_port())
    assert refused.returncode == 1 and "restore a backup" in refused.stderr
    replaced = db_path.parent / "replaced"
    replaced.mkdir()
    for name in (db_path.name, f"{db_path.name}-wal"):
        if (db_path.parent / name).exists():
            (db_path.parent / name).rename(replaced / name)
    for name in (f"{db_path.name}-shm", f"{db_path.name}-gen"):
        (db_path.parent / name).unlink(missing_ok=True)
    shutil.copy(backup, db_path)
    subprocess.run([*kvapp, "check"], cwd=ROOT, env=env, check=True, capture_output=True)
    server = server_factory()
    for key in ("key0000", "key0299"):
        assert curl(f"{server.url}/get?key={key}")[::2] == (200, items[key])


def damage_while_serving(db: Path, kind: str) -> None:
    page = 4096
    if kind == "garbage over table pages":
        noise = random.Random(3)
        for leaf in pages_of(db, "kv", "leaf")[::2]:
            overwrite(db, (leaf - 1) * page, noise.randbytes(page))
    elif kind == "zeroed index pages":
        for number in pages_of(db, "sqlite_autoindex_kv_1"):
            overwrite(db, (number - 1) * page, bytes(page))
    elif kind == "zeroed header":
        overwrite(db, 0, bytes(100))
    elif kind == "truncated":
        os.truncate(db, 3 * page)
    else:
        raise ValueError(kind)


@pytest.mark.parametrize(
    "kind", ["garbage over table pages", "zeroed index pages", "zeroed header", "truncated"]
)
def test_damage_while_serving_never_gives_a_wrong_answer(db_path, server_factory, kind, summary):
    items = build_database(db_path, count=300)
    server = server_factory()
    # The pages are damaged after the startup check passed and before any
    # reader connection cached them: every read below goes to the damaged file.
    damage_while_serving(db_path, kind)
    client = Client(server.port)
    tally = {"right": 0, "503": 0, "wrong": []}
    for key, value in items.items():
        status, headers, body = client.get(f"/get?key={key}")
        if (status, body) == (200, value):
            tally["right"] += 1
        elif status == 503 and body.startswith(b"the database file is damaged"):
            assert headers["retry-after"]
            tally["503"] += 1
        else:
            tally["wrong"].append((key, status, body[:60]))
    # A write may land on an undamaged page (200) or meet the damage (503),
    # never anything else; what it stored must read back or be refused.
    write_status = client.get("/set?written=after-damage")[0]
    assert write_status in (200, 503)
    status, _, body = client.get("/get?key=written")
    if status != 503:
        assert (status, body) == ((200, b"after-damage") if write_status == 200 else (404, body))
    assert tally["wrong"] == []
    assert tally["503"] > 0, "the damage was never noticed; the test damaged nothing"
    assert curl(f"{server.url}/")[0] == 200  # still up
    client.close()
    summary(
        f"[faults] damage while serving ({kind}): of {len(items)} reads"
        f" {tally['right']} right, {tally['503']} 503, 0 wrong"
    )
