"""The read cache stays exact: across repositories, processes and real servers, and with TTLs.

A "process" here is a SQLiteStore with its own cache, connections and
mapping of the -gen file, as each worker process has; the cross-process
tests use real subprocesses too.  To prove that a read was served from the
cache (and so that the test exercises invalidation, not SQLite), some tests
first change a row behind kvapp's back, with a plain sqlite3 connection,
which is outside the contract: the cached value must still be served then.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import sqlite3
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from helpers import ROOT, Clock, curl
from webtest import TestApp

from kvapp import create_app
from kvapp.config import load_config
from kvapp.store.base import Condition, DatabaseUnusable, Delete, Put, StorageBusy, Write
from kvapp.store.readcache import (
    COMMITS,
    FILE_BYTES,
    SLOTS,
    Generations,
    LockTimeout,
    generations_path,
    slot_of,
)
from kvapp.store.sqlite import READER_PAGE_CACHE_KIB, SQLiteStore


@pytest.fixture
def open_repo(db_path):
    repositories = []

    def make(**options) -> SQLiteStore:
        repository = SQLiteStore(str(db_path), **options)
        repositories.append(repository)
        return repository

    yield make
    for repository in repositories:
        repository.close()


def put(key, value=b"v", ttl=None, condition=None):
    return Write.of(Put(key, value, "text/plain", ttl, condition))


def behind_kvapps_back(db_path: Path, key: str, value: bytes) -> None:
    """Change a stored value with a plain sqlite3 connection, bypassing the counters."""
    conn = sqlite3.connect(db_path)
    with conn:
        assert conn.execute("UPDATE kv SET value = ? WHERE key = ?", (value, key)).rowcount == 1
    conn.close()


def test_a_repeated_read_is_served_from_the_cache(db_path, open_repo):
    repo = open_repo()
    repo.apply(put("k", b"one"))
    assert repo.get("k").value == b"one"
    behind_kvapps_back(db_path, "k", b"changed outside kvapp")
    assert repo.get("k").value == b"one"  # the cache answered, not SQLite
    assert open_repo(read_cache_bytes=0).get("k").value == b"changed outside kvapp"


def test_a_write_by_another_repository_is_seen_at_once_by_a_cached_reader(db_path, open_repo):
    reader, writer = open_repo(), open_repo()
    uncached_writer = open_repo(read_cache_bytes=0)  # a process without a cache still signals
    for n in range(300):
        key = f"k{n % 7}"
        source = writer if n % 2 else uncached_writer
        before = reader.get(key)
        assert reader.get(key) == before  # cached now (or cached absent)
        kind = n % 5
        if kind == 0:
            outcome = source.apply(put(key, f"v{n}".encode()))
            expected = (f"v{n}".encode(), outcome.revision)
        elif kind == 1:
            source.apply(Write.of(Delete(key)))
            expected = None
        elif kind == 2:
            outcome = source.apply(put(key, f"ttl{n}".encode(), ttl=3600))
            expected = (f"ttl{n}".encode(), outcome.revision)
        elif kind == 3:
            # A multi-key write, as /set?a=..&b=..: both keys change together.
            other = f"other{n % 3}"
            reader.get(other)
            outcome = source.apply(Write.of(Put(key, b"pair", "t"), Put(other, b"pair", "t")))
            assert reader.get(other) == (b"pair", "t", outcome.revision)
            expected = (b"pair", outcome.revision)
        else:
            current = source.get(key)
            condition = Condition(if_match=frozenset({current.revision})) if current else None
            outcome = source.apply(put(key, f"cas{n}".encode(), condition=condition))
            expected = (f"cas{n}".encode(), outcome.revision)
        got = reader.get(key)
        assert (got and (got.value, got.revision)) == expected, f"round {n}"


def test_a_failed_conditional_write_keeps_readers_caches(db_path, open_repo):
    reader, writer = open_repo(), open_repo()
    writer.apply(put("k", b"one"))
    reader.get("k")
    with pytest.raises(Exception, match="condition"):
        writer.apply(put("k", b"two", condition=Condition(if_match=frozenset({99}))))
    behind_kvapps_back(db_path, "k", b"outside")
    assert reader.get("k").value == b"one"  # nothing was bumped: still a hit


def test_ttl_still_hides_a_cached_key_at_its_deadline(open_repo):
    clock = Clock()
    repo = open_repo(clock=clock)
    other = open_repo(clock=clock)
    repo.apply(put("k", b"short", ttl=2))
    assert repo.get("k").value == b"short"
    clock.now += 1.999
    assert repo.get("k").value == b"short"
    clock.now += 0.001
    assert repo.get("k") is None  # the cached entry knows its deadline
    assert other.get("k") is None
    # A write after expiry is seen too, though the expired row still exists.
    other.apply(put("k", b"again"))
    assert repo.get("k").value == b"again"


def test_an_absent_key_is_cached_and_its_creation_seen_at_once(db_path, open_repo):
    reader, writer = open_repo(), open_repo()
    writer.apply(put("present"))
    for n in range(50):
        key = f"absent{n}"
        assert reader.get(key) is None
        assert reader.get(key) is None
        writer.apply(put(key, b"now"))
        assert reader.get(key).value == b"now"


def test_the_cache_stays_within_its_byte_cap(db_path, open_repo):
    cap = 256 * 1024
    writer = open_repo(read_cache_bytes=0)
    for start in range(0, 6000, 500):
        writer.set_many(
            [(f"key{n:05d}", b"v" * (n % 700), "text/plain") for n in range(start, start + 500)]
        )
    repo = open_repo(read_cache_bytes=cap)
    repo.get("warm up the connection")
    cache = repo._cache
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(6000):
            assert len(repo.get(f"key{n:05d}").value) == n % 700
            repo.get(f"missing{n}")
            assert cache.bytes <= cap
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(cache) < 2000  # 12,000 different keys were read
    # Real memory, not only the bookkeeping: what the cache holds, plus the
    # dict tables' spare room, stays within the cap.
    assert grown <= cap * 1.25, grown
    # A value bigger than a sixteenth of the cap is never kept.
    writer.apply(put("big", b"x" * (cap // 16)))
    assert repo.get("big") is not None
    assert "big" not in cache._entries


def test_a_slot_left_odd_by_a_dead_writer_is_not_cached_until_the_next_write(db_path, open_repo):
    repo = open_repo()
    repo.apply(put("k", b"one"))
    slot = slot_of("k")
    # A writer that died between begin (W3) and end (W5): the slot stays odd.
    dead = Generations(generations_path(str(db_path)))
    with pytest.raises(KeyboardInterrupt):
        with dead.writing():
            dead.begin(["k"])
            dead._changing.clear()  # as if the process had died here
            raise KeyboardInterrupt
    dead.close()
    assert repo._generations.counters[slot] % 2 == 1
    assert repo.get("k").value == b"one"
    behind_kvapps_back(db_path, "k", b"outside")
    assert repo.get("k").value == b"outside"  # not cached: read from SQLite again
    other = open_repo()
    other.apply(put("k", b"two"))
    assert repo._generations.counters[slot] % 2 == 0
    assert repo.get("k").value == b"two"
    behind_kvapps_back(db_path, "k", b"outside again")
    assert repo.get("k").value == b"two"  # cached again


def test_writers_of_two_processes_exclude_each_other_and_reads_never_wait(db_path, open_repo):
    repo = open_repo(busy_timeout_ms=200)
    repo.apply(put("k", b"one"))
    holder = Generations(generations_path(str(db_path)))  # another process's writer
    with holder.writing():
        with pytest.raises(StorageBusy):
            repo.apply(put("k", b"two"))
        # Reads, cached or not, go on while another writer holds the lock.
        assert repo.get("k").value == b"one"
        assert open_repo(read_cache_bytes=0).get("k").value == b"one"
    holder.close()
    assert repo.apply(put("k", b"three")).revision == 2
    assert repo.get("k").value == b"three"


def _in_thread(work) -> tuple[threading.Thread, threading.Event, list]:
    """Run work() in a thread; return it, an Event set when work returned, and its result."""
    done, result = threading.Event(), []

    def run() -> None:
        result.append(work())
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, done, result


def test_a_writer_waits_for_the_lock_of_another_process_and_writes_once_it_is_free(
    db_path, open_repo
):
    repo = open_repo(busy_timeout_ms=30_000)
    repo.apply(put("k", b"one"))
    holder = Generations(generations_path(str(db_path)))  # another process's writer
    with holder.writing():
        thread, done, result = _in_thread(lambda: repo.apply(put("k", b"two")))
        assert not done.wait(0.3)  # still waiting: nothing stored meanwhile
        assert repo.get("k").value == b"one"
    thread.join(30)
    assert result[0].revision == 2
    assert repo.get("k").value == b"two"
    holder.close()


def given_up(db_path: Path) -> tuple[str, Generations, Generations]:
    """Return the -gen file, a writer that gave up on its lock, and the holder of that lock.

    The holder stands for another process's writer and still holds the lock
    (unlock() lets it go); the writer's lock thread still waits in flock.
    """
    db_path.parent.mkdir()
    path = generations_path(str(db_path))
    writer = Generations(path, lock_timeout=0.2)
    holder = Generations(path)
    holder._lock()
    with pytest.raises(LockTimeout):
        writer._lock()
    assert writer._locker is not None
    return path, writer, holder


def unlock(generations: Generations) -> None:
    fcntl.flock(generations._fd, fcntl.LOCK_UN)


def test_a_writer_that_gave_up_on_the_lock_leaves_it_to_the_next_process(db_path):
    path, impatient, holder = given_up(db_path)
    unlock(holder)
    # The impatient writer's lock thread still waits in flock, and gets the
    # lock now: nobody asks for it any more, so it must let it go.
    other = Generations(path, lock_timeout=10)
    with other.writing():  # LockTimeout if the lock were kept
        pass
    # Asked again while its thread still waits for the lock given up on:
    # that wait now serves the new ask.
    with holder.writing():
        with pytest.raises(LockTimeout):
            impatient._lock()
        impatient.lock_timeout = 30
        thread, done, _ = _in_thread(impatient._lock)
        assert not done.wait(0.3)
    thread.join(30)
    assert done.is_set()
    probe = Generations(path, lock_timeout=0.2)
    with pytest.raises(LockTimeout):  # impatient holds it now
        probe._lock()
    probe.close()
    unlock(impatient)
    for generations in (impatient, holder, other):
        generations.close()


def test_closing_while_the_lock_thread_waits_keeps_no_lock(db_path):
    path, closing, holder = given_up(db_path)
    locker = closing._locker
    assert locker is not None
    closing.close()
    unlock(holder)
    # Its thread, in flock until now, ends without error (pytest warns of a
    # thread that raised, and pyproject.toml makes warnings errors) and holds nothing.
    locker.thread.join(10)
    assert not locker.thread.is_alive()
    other = Generations(path, lock_timeout=10)
    with other.writing():
        pass
    other.close()
    holder.close()


def test_a_writer_after_a_give_up_never_shares_the_lock_with_the_waiting_thread(db_path):
    path, mine, holder = given_up(db_path)
    locker = mine._locker
    assert locker is not None
    # Keep the thread between its flock and its look at the state.
    locker._changed.acquire()
    unlock(holder)
    try:
        thread, done, _ = _in_thread(mine._lock)
        # Its flock is on the same open file: a LOCK_NB by the writer would
        # succeed alongside it, and the thread would unlock the writer's lock.
        done.wait(0.3)
    finally:
        locker._changed.release()
    thread.join(30)
    assert done.is_set()
    with pytest.raises(LockTimeout):  # mine holds it now
        other = Generations(path, lock_timeout=0.3)
        try:
            other._lock()
        finally:
            other.close()
    unlock(mine)
    mine.close()
    holder.close()


def test_closing_while_a_writer_waits_still_ends_the_lock_thread(db_path):
    db_path.parent.mkdir()
    path = generations_path(str(db_path))
    closing = Generations(path, lock_timeout=0.5)
    holder = Generations(path)
    with holder.writing():
        thread, done, _ = _in_thread(lambda: pytest.raises(LockTimeout, closing._lock))
        for _ in range(1000):  # until the writer waits for the thread
            locker = closing._locker
            if locker is not None and not locker.idle():
                break
            time.sleep(0.01)
        assert locker is not None
        closing.close()
        thread.join(30)  # the writer gives up after the close
        assert done.is_set()
    locker.thread.join(10)
    assert not locker.thread.is_alive()
    holder.close()


def test_reads_do_not_wait_for_an_open_write_transaction(db_path, open_repo):
    repo = open_repo(busy_timeout_ms=200)
    uncached = open_repo(read_cache_bytes=0)
    repo.apply(put("k", b"one"))
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("UPDATE kv SET value = 'uncommitted'")
    try:
        assert repo.get("k").value == b"one"
        assert uncached.get("k").value == b"one"
        with pytest.raises(StorageBusy):
            repo.apply(put("k", b"two"))
    finally:
        other.execute("ROLLBACK")
        other.close()


# -- real processes -----------------------------------------------------------

# A second process: reads the keys named on stdin, answers each as one JSON line.
READER = """
import json, sys
from kvapp.store.sqlite import SQLiteStore
repo = SQLiteStore(sys.argv[1])
for line in sys.stdin:
    item = repo.get(line.strip())
    print(json.dumps(item and [item.value.decode(), item.revision]), flush=True)
"""


def test_a_write_acknowledged_here_is_seen_at_once_by_another_process_holding_it_cached(
    db_path, open_repo
):
    writer = open_repo()
    writer.apply(put("k", b"start"))
    with subprocess.Popen(
        [sys.executable, "-c", READER, str(db_path)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:

        def read(key: str):
            child.stdin.write(key + "\n")
            child.stdin.flush()
            return json.loads(child.stdout.readline())

        assert read("k")[0] == "start"
        behind_kvapps_back(db_path, "k", b"outside")
        assert read("k")[0] == "start"  # the child holds it in its cache
        for n in range(200):
            outcome = writer.apply(put("k", f"v{n}".encode()))
            assert read("k") == [f"v{n}", outcome.revision]
            assert read("k") == [f"v{n}", outcome.revision]  # and caches the new one
        child.stdin.close()
        assert child.wait(timeout=30) == 0


# Concurrent writers and readers in separate processes.  After a writer's
# apply() of value n returns it publishes n on a shared board; a reader that
# saw n published before it started a read must get n or later.  The two
# writers' keys share slots pairwise (same crc32 slot), so their counter
# updates meet; they run on both cores at once.
KEYS = (("a", "b", "c"), ("a7016", "b6447", "c7551"))
STRESS = """
import mmap, os, sys, time
from kvapp.store.readcache import MISS
from kvapp.store.sqlite import SQLiteStore
from kvapp.store.base import Put, Write
role, db, board, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
keys = (("a", "b", "c"), ("a7016", "b6447", "c7551"))
fd = os.open(board, os.O_RDWR)
acked = memoryview(mmap.mmap(fd, 128)).cast("Q")
repo = SQLiteStore(db)
if role.startswith("writer"):
    w = int(role[-1])
    deadline = time.monotonic() + 60
    while not (acked[8] and acked[9]) and time.monotonic() < deadline:
        time.sleep(0.001)  # both readers are reading
    for n in range(1, rounds + 1):
        repo.apply(Write.of(Put(keys[w][n % 3], str(n).encode(), "t")))
        acked[w * 3 + n % 3] = n
    acked[6 + w] = 1
else:
    stale = reads = hits = 0
    repo.get("a")
    acked[8 + int(role[-1])] = 1
    while not (acked[6] and acked[7]) and reads < 20 * rounds:
        for w in (0, 1):
            for i, key in enumerate(keys[w]):
                floor = acked[w * 3 + i]
                hits += repo._cache.lookup(key, int(time.time() * 1000)) is not MISS
                item = repo.get(key)
                reads += 1
                if (int(item.value) if item else 0) < floor:
                    stale += 1
    print(stale, reads, hits)
"""


def test_concurrent_processes_never_read_older_than_an_acknowledged_write(db_path, tmp_path):
    assert len({slot_of(key) for key in KEYS[0] + KEYS[1]}) == 3
    SQLiteStore(str(db_path)).close()
    board = tmp_path / "board"
    board.write_bytes(bytes(128))
    rounds = "3000"

    def start(role: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", STRESS, role, str(db_path), str(board), rounds],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )

    readers = [start("reader0"), start("reader1")]
    writers = [start("writer0"), start("writer1")]
    for writer in writers:
        writer.communicate(timeout=120)
        assert writer.returncode == 0
    for reader in readers:
        out, _ = reader.communicate(timeout=120)
        stale, reads, hits = map(int, out.split())
        assert stale == 0
        assert reads > hits > 0, (reads, hits)  # both hits and misses happened
    with open(board, "r+b") as handle, mmap.mmap(handle.fileno(), 128) as shared:
        done = memoryview(shared).cast("Q")
        assert (done[6], done[7], done[8], done[9]) == (1, 1, 1, 1)
        done.release()


@pytest.mark.slow
def test_two_servers_on_one_database_see_each_others_writes_at_once(server_factory):
    first, second = server_factory(), server_factory()
    for n in range(60):
        key = f"/kv/k{n % 4}"
        status, _, _ = curl(f"{second.url}{key}")  # cached in the second server (or absent)
        if n % 3 == 2:
            status, _, _ = curl("-X", "DELETE", f"{first.url}{key}")
            assert curl(f"{second.url}{key}")[0] == 404, n
        else:
            body = f"v{n}".encode()
            status, headers, _ = curl(
                "-X", "PUT", "--data-binary", "@-", f"{first.url}{key}", data=body
            )
            assert status in (201, 204)
            status, got_headers, got = curl(f"{second.url}{key}")
            assert (status, got, got_headers["etag"]) == (200, body, headers["etag"]), n


def test_the_generation_file_is_small_and_shared(db_path, open_repo):
    repo = open_repo()
    path = Path(generations_path(str(db_path)))
    assert path.stat().st_size == FILE_BYTES == SLOTS * 8 + 4096 <= 72 * 1024
    assert os.stat(path).st_blocks * 512 >= FILE_BYTES  # allocated: no SIGBUS on a full disk
    repo.apply(put("k"))
    with open(path, "r+b") as handle, mmap.mmap(handle.fileno(), FILE_BYTES) as shared:
        counters = memoryview(shared).cast("Q")
        assert counters[slot_of("k")] == 2  # begun and ended: even
        assert counters[COMMITS] == 1  # the watchers' feed: one write transaction so far
        counters.release()


def test_a_generation_file_of_another_layout_is_refused(db_path, open_repo):
    open_repo().close()
    path = Path(generations_path(str(db_path)))
    path.write_bytes(bytes(SLOTS * 8 * 2))
    with pytest.raises(DatabaseUnusable, match="made by another kvapp"):
        SQLiteStore(str(db_path))


@pytest.mark.parametrize(
    ("cache_bytes", "expected"),
    [("0", b"changed outside kvapp"), ("33554432", b"one")],
    ids=["off", "default"],
)
def test_read_cache_bytes_setting_turns_the_cache_on_and_off(tmp_path, cache_bytes, expected):
    """read_cache_bytes from the config reaches the repository: 0 reads SQLite every time."""
    db = tmp_path / "kv.sqlite3"
    environ = {"KVAPP_DATABASE": str(db), "KVAPP_READ_CACHE_BYTES": cache_bytes}
    app = create_app(load_config(environ=environ))
    try:
        client = TestApp(app, extra_environ={"HTTP_HOST": "localhost"})
        client.get("/set?k=one")
        assert client.get("/get?key=k").body == b"one"  # cached, when there is a cache
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE kv SET value = ? WHERE key = 'k'", (b"changed outside kvapp",))
        conn.close()
        assert client.get("/get?key=k").body == expected
    finally:
        app.close()


def test_reader_connections_keep_a_small_page_cache(open_repo):
    """Each thread's reader caches few pages (memory stays bounded with many threads)."""
    repo = open_repo()
    repo.set_many([("k", b"v", "text/plain")])
    reader = repo._reader()
    assert reader.execute("PRAGMA cache_size").fetchone()[0] == -READER_PAGE_CACHE_KIB
    assert READER_PAGE_CACHE_KIB <= 512
