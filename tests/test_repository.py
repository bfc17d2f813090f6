"""The repository on a temporary SQLite file: commits, atomicity, error translation.

The tests marked BOTH are about the contract and run on PostgreSQL too;
PostgreSQL's own error translation is in test_postgres.py.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import ROOT, stored

from kvapp.store import open_store
from kvapp.store.base import DatabaseUnusable, StorageBusy, StorageError, StorageFull
from kvapp.store.sqlite import SQLiteStore

TEXT = "text/plain; charset=utf-8"
BOTH = pytest.mark.backends("sqlite", "postgres")


@pytest.fixture
def repo(make_settings):
    repository = open_store(make_settings(busy_timeout_ms=100))
    yield repository
    repository.close()


def value_of(repository: SQLiteStore, key: str) -> bytes | None:
    item = repository.get(key)
    return None if item is None else item.value


def rows_on_disk(path: Path) -> list[tuple[str, bytes]]:
    """Return every (key, value) in the file, read by a connection of our own."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT key, value FROM kv ORDER BY key").fetchall()
    finally:
        conn.close()


def fill(path: Path, count: int = 300) -> None:
    """Create a kvapp database at path spanning many pages, then close it cleanly."""
    repository = SQLiteStore(str(path))
    try:
        for start in range(0, count, 50):
            repository.set_many(
                [
                    (f"key{i:04d}", i.to_bytes(2, "big") * 100, TEXT)
                    for i in range(start, start + 50)
                ]
            )
    finally:
        repository.close()
    assert not Path(f"{path}-wal").exists()  # the last close checkpointed the WAL


# -- commits -----------------------------------------------------------------


def test_a_new_database_and_its_folder_are_created(tmp_path: Path):
    path = tmp_path / "new" / "deeper" / "kv.sqlite3"
    repository = SQLiteStore(str(path))
    try:
        assert path.is_file()
        assert repository.get("anything") is None
    finally:
        repository.close()


def test_a_new_database_waits_for_another_process_creating_it(tmp_path: Path):
    """Two workers (granian --workers 2) open one new file at once.

    The other's write lock makes switching to WAL fail at once with
    SQLITE_BUSY, without SQLite's busy handler; the store must wait instead.
    """
    path = tmp_path / "kv.sqlite3"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE unrelated (x)")
    release = threading.Timer(0.3, lambda: other.execute("ROLLBACK"))
    release.start()
    try:
        repository = SQLiteStore(str(path), busy_timeout_ms=5000)
    finally:
        release.join()
        other.close()
    try:
        repository.set_many([("a", b"1", TEXT)])
        assert value_of(repository, "a") == b"1"
    finally:
        repository.close()


def test_an_existing_database_opens_while_another_process_holds_the_write_lock(tmp_path):
    # A worker restarted (after a crash) while a long import or another
    # process writes must start: a failed start counted as a worker's death,
    # and five of them stopped the whole server.
    path = tmp_path / "kv.sqlite3"
    SQLiteStore(str(path)).close()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        repository = SQLiteStore(str(path), busy_timeout_ms=100)
        try:
            assert repository.get("a") is None  # reads go on; writes wait their turn
            with pytest.raises(StorageBusy):
                repository.set_many([("a", b"1", TEXT)])
        finally:
            repository.close()
    finally:
        other.execute("ROLLBACK")
        other.close()


@BOTH
def test_reopen_after_commit_sees_the_data(repo: SQLiteStore, make_settings, database: str):
    repo.set_many([("a", b"1", TEXT), ("b", b"", TEXT)])
    other = open_store(make_settings())  # while the first is still open
    try:
        assert value_of(other, "a") == b"1"
        assert value_of(other, "b") == b""
    finally:
        other.close()
    repo.close()
    again = open_store(make_settings())
    try:
        assert value_of(again, "a") == b"1"
        assert value_of(again, "b") == b""
    finally:
        again.close()
    assert stored(database, "SELECT key, value FROM kv ORDER BY key") == [("a", b"1"), ("b", b"")]


@BOTH
def test_values_are_stored_as_exact_bytes(repo: SQLiteStore):
    value = bytes(range(256)) * 3
    repo.set_many([("k", value, TEXT)])
    item = repo.get("k")
    assert item is not None
    assert (item.value, item.content_type) == (value, TEXT)


@BOTH
def test_a_later_write_replaces_the_value(repo: SQLiteStore):
    repo.set_many([("k", b"old", TEXT)])
    repo.set_many([("k", b"new", TEXT)])
    assert value_of(repo, "k") == b"new"


@BOTH
def test_every_write_gets_a_higher_revision(repo: SQLiteStore):
    first = repo.set_many([("a", b"1", TEXT), ("b", b"2", TEXT)])
    second = repo.set_many([("a", b"3", TEXT)])
    assert second > first
    assert repo.get("a").revision == second
    assert repo.get("b").revision == first


@BOTH
def test_keys_compare_exactly(repo: SQLiteStore):
    repo.set_many([("K", b"upper", TEXT), ("k", b"lower", TEXT), ("é", b"nfc", TEXT)])
    assert value_of(repo, "K") == b"upper"
    assert value_of(repo, "k") == b"lower"
    assert value_of(repo, "e\u0301") is None  # no Unicode normalisation


# -- atomic multi-pair writes -------------------------------------------------


@BOTH
def test_multi_pair_write_stores_all_pairs(repo: SQLiteStore, database: str):
    repo.set_many([(f"k{i}", str(i).encode(), TEXT) for i in range(100)])
    rows = stored(database, "SELECT key, value FROM kv ORDER BY key")
    assert rows == sorted((f"k{i}", str(i).encode()) for i in range(100))


def test_multi_pair_write_that_fails_half_way_stores_nothing(repo: SQLiteStore, db_path: Path):
    repo.set_many([("a", b"old", TEXT)])
    writer = repo._writer
    pages = writer.execute("PRAGMA page_count").fetchone()[0]
    writer.execute(f"PRAGMA max_page_count = {pages + 2}")
    # The first two pairs fit in the pages there are; the third needs many more.
    with pytest.raises(StorageFull):
        repo.set_many([("a", b"new", TEXT), ("b", b"2", TEXT), ("c", b"x" * 200_000, TEXT)])
    assert value_of(repo, "a") == b"old"
    assert value_of(repo, "b") is None
    assert rows_on_disk(db_path) == [("a", b"old")]


# -- error translation --------------------------------------------------------


def test_full_database_raises_storage_full_and_recovers(repo: SQLiteStore, db_path: Path):
    repo.set_many([("a", b"1", TEXT)])
    writer = repo._writer
    pages = writer.execute("PRAGMA page_count").fetchone()[0]
    # max_page_count cannot go below the current size: this caps it there.
    assert writer.execute("PRAGMA max_page_count = 1").fetchone()[0] == pages
    with pytest.raises(StorageFull) as caught:
        repo.set_many([("big", b"x" * 100_000, TEXT), ("b", b"2", TEXT)])
    assert isinstance(caught.value, StorageError)
    assert "full" in str(caught.value) and "\n" not in str(caught.value)
    assert value_of(repo, "big") is None
    assert value_of(repo, "b") is None
    assert value_of(repo, "a") == b"1"  # reads keep working
    assert rows_on_disk(db_path) == [("a", b"1")]

    writer.execute("PRAGMA max_page_count = 1073741823")
    repo.set_many([("big", b"x" * 100_000, TEXT), ("b", b"2", TEXT)])
    assert value_of(repo, "big") == b"x" * 100_000
    assert value_of(repo, "b") == b"2"


def test_lock_held_elsewhere_raises_storage_busy_and_reads_work(repo: SQLiteStore, db_path: Path):
    repo.set_many([("a", b"1", TEXT)])
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        other.execute("INSERT INTO meta (name, value) VALUES ('held', 1)")
        with pytest.raises(StorageBusy) as caught:
            repo.set_many([("b", b"2", TEXT)])
        assert "\n" not in str(caught.value)
        assert value_of(repo, "a") == b"1"  # WAL: readers do not wait for the writer
        assert value_of(repo, "b") is None
        other.execute("ROLLBACK")
    finally:
        other.close()
    repo.set_many([("b", b"2", TEXT)])
    assert value_of(repo, "b") == b"2"


@pytest.mark.parametrize("how", ["renamed", "deleted"])
def test_a_read_after_the_file_moved_says_so_and_not_that_nothing_was_stored(
    repo: SQLiteStore, db_path: Path, how: str
):
    repo.set_many([("a", b"1", TEXT)])
    kept = db_path.with_name("kept.sqlite3")
    os.link(db_path, kept)
    db_path.unlink()
    if how == "renamed":
        os.link(kept, db_path.with_name("renamed.sqlite3"))
    caught: list[BaseException] = []

    def read_on_a_new_thread() -> None:  # a new thread opens its own connection
        try:
            repo.get("never-read")
        except StorageError as exc:
            caught.append(exc)

    try:
        reader = threading.Thread(target=read_on_a_new_thread)
        reader.start()
        reader.join(30)
        assert [str(exc) for exc in caught] == [
            "the database file was moved or deleted; put it back"
        ]
        with pytest.raises(StorageError, match="moved or deleted: nothing was stored; put it back"):
            repo.set_many([("b", b"2", TEXT)])
    finally:
        os.link(kept, db_path)
    repo.set_many([("b", b"2", TEXT)])
    assert value_of(repo, "b") == b"2"


def test_a_busy_write_stores_nothing_of_its_pairs(repo: SQLiteStore, db_path: Path):
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StorageBusy):
            repo.set_many([("a", b"1", TEXT), ("b", b"2", TEXT)])
        other.execute("COMMIT")
    finally:
        other.close()
    assert rows_on_disk(db_path) == []


# -- damaged and foreign files ------------------------------------------------


def damage_garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 64)


def damage_zeroed_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:100] = bytes(100)
    path.write_bytes(bytes(data))


def damage_truncated_mid_page(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])


def damage_truncated_whole_pages(path: Path) -> None:
    data = path.read_bytes()
    page_size = int.from_bytes(data[16:18], "big")
    path.write_bytes(data[: (len(data) // page_size // 2) * page_size])


def damage_truncated_header(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:60])


def _zero_page(path: Path, page: int) -> None:
    data = bytearray(path.read_bytes())
    page_size = int.from_bytes(data[16:18], "big")
    start = (page - 1) * page_size
    data[start : start + page_size] = bytes(page_size)
    path.write_bytes(bytes(data))


def _root_page(path: Path, name: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = ?", (name,)
        ).fetchone()[0]
    finally:
        conn.close()


def damage_index_page(path: Path) -> None:
    """Zero the key index's root page: the file opens, PRAGMA quick_check reports it."""
    _zero_page(path, _root_page(path, "sqlite_autoindex_kv_1"))
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA quick_check").fetchall() != [("ok",)]
    finally:
        conn.close()


def damage_table_page(path: Path) -> None:
    """Zero the kv table's root page: SQLite itself calls the image malformed."""
    _zero_page(path, _root_page(path, "kv"))


def foreign_database(path: Path) -> None:
    path.unlink()
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    conn.execute("INSERT INTO notes (body) VALUES ('mine')")
    conn.commit()
    conn.close()


def foreign_kv_and_meta(path: Path) -> None:
    """Tables named like kvapp's, but someone else's."""
    path.unlink()
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE kv (k, v)")
    conn.execute("CREATE TABLE meta (m)")
    conn.commit()
    conn.close()


def other_schema_version(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = 999 WHERE name = 'schema_version'")
    conn.commit()
    conn.close()


DAMAGE = [
    damage_garbage,
    damage_zeroed_header,
    damage_truncated_mid_page,
    damage_truncated_whole_pages,
    damage_truncated_header,
    damage_index_page,
    damage_table_page,
    foreign_database,
    foreign_kv_and_meta,
    other_schema_version,
]


@pytest.mark.parametrize("damage", DAMAGE, ids=[d.__name__ for d in DAMAGE])
def test_unfit_file_is_refused_with_one_line_naming_it(damage, db_path: Path):
    fill(db_path)
    damage(db_path)
    before = db_path.read_bytes()
    with pytest.raises(DatabaseUnusable) as caught:
        SQLiteStore(str(db_path)).close()
    message = str(caught.value)
    assert "\n" not in message and "\r" not in message
    assert str(db_path) in message
    assert len(message) < 300
    # Refusing a file must not change it: it may be someone's only copy.
    assert db_path.read_bytes() == before
    assert not Path(f"{db_path}-wal").exists()


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (damage_garbage, "not an SQLite database"),
        (damage_zeroed_header, "not an SQLite database"),
        (damage_truncated_mid_page, "truncated"),
        (damage_truncated_whole_pages, "truncated"),
        (damage_truncated_header, "truncated"),
        (damage_index_page, "damaged"),
        (foreign_database, "did not create"),
        (foreign_kv_and_meta, "did not create"),
        (other_schema_version, "schema version"),
    ],
    ids=lambda x: getattr(x, "__name__", x),
)
def test_refusal_says_what_is_wrong(damage, words: str, db_path: Path):
    fill(db_path)
    damage(db_path)
    with pytest.raises(DatabaseUnusable, match=words):
        SQLiteStore(str(db_path))


def test_quick_check_is_skipped_above_the_size_limit(db_path: Path):
    """startup_check_max_bytes bounds startup time: a big file is opened unchecked."""
    fill(db_path)
    damage_index_page(db_path)
    repository = SQLiteStore(str(db_path), startup_check_max_bytes=1024)
    repository.close()
    with pytest.raises(DatabaseUnusable):
        SQLiteStore(str(db_path), startup_check_max_bytes=os.path.getsize(db_path))


def test_an_empty_file_becomes_a_database(db_path: Path):
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"")
    repository = SQLiteStore(str(db_path))
    try:
        repository.set_many([("a", b"1", TEXT)])
        assert value_of(repository, "a") == b"1"
    finally:
        repository.close()


def test_a_folder_in_place_of_the_file_is_refused(db_path: Path):
    db_path.mkdir(parents=True)
    (db_path / "x").write_bytes(b"x")
    with pytest.raises(DatabaseUnusable) as caught:
        SQLiteStore(str(db_path))
    assert str(db_path) in str(caught.value) and "\n" not in str(caught.value)


@BOTH
def test_a_listing_and_its_revision_come_from_one_snapshot(repo):
    # One writer puts k0001, k0002, ... a write each, so the store holds
    # exactly the first (revision - start) of them at every revision.  Every
    # listing taken meanwhile must hold exactly the keys of the revision it
    # reports: read apart, a write could land between the two reads.
    start = repo.list_keys("k", None, 10).revision
    count = 300
    done = threading.Event()
    mismatches: list[tuple[int, int]] = []
    listings = 0

    def write() -> None:
        try:
            for number in range(1, count + 1):
                repo.set_many([(f"k{number:04d}", b"v", TEXT)])
        finally:
            done.set()

    writer = threading.Thread(target=write)
    writer.start()
    while not done.is_set() or listings == 0:
        revision, keys = repo.list_keys("k", None, 1000)
        expected = [f"k{number:04d}" for number in range(1, revision - start + 1)]
        if keys != expected:
            mismatches.append((revision, len(keys)))
        listings += 1
    writer.join()
    assert mismatches == []
    assert repo.list_keys("k", None, 1000) == (start + count, [f"k{n:04d}" for n in range(1, 301)])


# -- connections: opened by threads, closed with them and with the store -------


def files_open(path: Path) -> int:
    """Return how many file descriptors of this process are open on path."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
        except OSError:  # closed meanwhile (listdir's own descriptor)
            pass
    return count


def test_a_thread_s_reading_connection_ends_with_the_thread(repo: SQLiteStore, db_path: Path):
    # granian's blocking threads, the tail's refresher and the feed's listener
    # come and go: each opens a reading connection, which must not outlive it.
    # (SQLite keeps the descriptor of a closed connection open for the next
    # one while another connection of the process holds locks on the file,
    # https://sqlite.org/src/doc/trunk/src/os_unix.c, unixInodeInfo.pUnused:
    # so count after one thread has come and gone.)
    repo.set_many([("a", b"1", TEXT)])
    wal = db_path.with_name(db_path.name + "-wal")

    def read_in_a_thread() -> None:
        thread = threading.Thread(target=lambda: repo.list_keys("", None, 10))
        thread.start()
        thread.join()

    read_in_a_thread()
    before = (files_open(db_path), files_open(wal))
    for _ in range(10):
        read_in_a_thread()
    assert (files_open(db_path), files_open(wal)) == before


@BOTH
@pytest.mark.parametrize(
    "call",
    [
        lambda store: store.get("a"),
        lambda store: store.list_keys("", None, 10),
        lambda store: store.history((0, 0), "", 10),
        lambda store: store.dump(None, 10),
        lambda store: store.stats(),
        lambda store: store.check_health(),
        lambda store: store.set_many([("b", b"2", TEXT)]),
        lambda store: store.purge_expired(),
    ],
)
def test_a_closed_store_opens_nothing_again(make_settings, database: str, db_path: Path, call):
    # A request or thread that outlives the server's stop gets a 503, and
    # leaves no connection or file behind (SQLite: no -wal or -shm again).
    store = open_store(make_settings())
    store.set_many([("a", b"1", TEXT)])
    thread = threading.Thread(target=lambda: store.list_keys("", None, 10))
    thread.start()
    thread.join()
    store.close()
    for _ in range(2):  # also once no reading connection of this thread is left
        with pytest.raises(StorageError, match="^the store is closed: the server is stopping"):
            call(store)
    if database == str(db_path):
        assert sorted(p.name for p in db_path.parent.iterdir() if "-" in p.name) == [
            "kv.sqlite3-gen"
        ]
    else:
        assert store._pool_pid == 0 and store._listener is None


@BOTH
def test_closing_the_store_ends_its_group_commit_monitor(make_settings):
    def monitors() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "kvapp-group-commit-monitor"}

    before = monitors()
    store = open_store(make_settings())
    store.set_many([("a", b"1", TEXT)])  # the first batch starts the monitor
    (monitor,) = monitors() - before
    store.close()
    monitor.join(10)
    assert not monitor.is_alive()


CLOSE_DURING_A_READ = """
import sys, threading
from kvapp.store.base import StorageError
from kvapp.store.sqlite import SQLiteStore

store = SQLiteStore(sys.argv[1])
store.set_many([("a", b"1", "text/plain")])
inside, release = threading.Event(), threading.Event()


def blocked(key):
    inside.set()  # this thread is inside SQLite, stepping the SELECT
    release.wait(10)
    return key


def read():
    conn = store._reader()
    conn.create_function("blocked", 1, blocked)
    print("read", conn.execute("SELECT blocked(key) FROM kv").fetchall(), flush=True)
    try:
        store.list_keys("", None, 10)
    except StorageError as exc:
        print("then", exc, flush=True)


reader = threading.Thread(target=read)
reader.start()
inside.wait(10)
closer = threading.Thread(target=store.close)
closer.start()
closer.join(10)  # close() returns without waiting for the read
release.set()
reader.join(10)
"""


def test_closing_the_store_during_another_thread_s_read_neither_crashes_nor_waits(tmp_path):
    # A connection closed while another thread is inside SQLite with it
    # crashed the process with a segmentation fault: a request that outlived
    # the server's stop would have taken the process down at its exit.
    result = subprocess.run(
        [sys.executable, "-c", CLOSE_DURING_A_READ, str(tmp_path / "kv.sqlite3")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout == (
        "read [('a',)]\nthen the store is closed: the server is stopping; retry\n"
    )
    # The reader's connection was closed by its own thread: nothing is left open.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kv.sqlite3", "kv.sqlite3-gen"]


@pytest.mark.parametrize("suffix", ["-wal", "-shm"])
def test_a_wal_or_shm_file_removed_while_starting_is_not_taken_for_read_only(
    tmp_path, monkeypatch, suffix
):
    # Another process's last connection removes -wal and -shm as it closes
    # (workers starting together, a data tool): between "it exists" and "may
    # I write it" the file can go, and a file that is gone is not read-only.
    path = tmp_path / "kv.sqlite3"
    SQLiteStore(str(path)).close()
    leftover = Path(f"{path}{suffix}")
    leftover.touch()
    access = os.access

    def closed_meanwhile(name, mode, **kwargs):
        if Path(name) == leftover and leftover.exists():
            leftover.unlink()
        return access(name, mode, **kwargs)

    monkeypatch.setattr(os, "access", closed_meanwhile)
    store = SQLiteStore(str(path))
    try:
        assert store.set_many([("a", b"1", "text/plain")]) >= 1
    finally:
        store.close()
