"""PostgreSQL's own side of the repository: URL, schema, byte order, sessions, errors, faults.

The contract itself (writes, conditions, TTL, listing, the HTTP API) is pinned
by the tests that run on both backends; these pin what only PostgreSQL has:
its session settings, its SQLSTATEs, a server that goes away and comes back,
and a connection lost in the middle of a batch.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import psycopg
import pytest
import webtest
from faultkit import Client, needs_root, require_tool
from helpers import ROOT, free_port, running_cluster, server_environ, stored
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pgcluster import server_owner

from kvapp import create_app
from kvapp.config import ConfigError, load_config
from kvapp.store import open_store
from kvapp.store.base import (
    WHOLE,
    Condition,
    ConditionFailed,
    DatabaseUnusable,
    History,
    Put,
    StorageBusy,
    StorageUnavailable,
    Write,
)
from kvapp.store.location import redact
from kvapp.store.metricsfile import metrics_path
from kvapp.store.postgres import (
    COMMIT_UNKNOWN,
    RECONNECTS,
    STALLED_AFTER,
    UNREACHABLE,
    PostgresStore,
)
from kvapp.store.sqlite import SQLiteStore

pytestmark = pytest.mark.backends("postgres")

TEXT = "text/plain; charset=utf-8"
FULL_BODY = b"the disk is full: nothing was stored; free space and retry\n"


def dbname(url: str) -> str:
    return url.rpartition("/")[2]


@pytest.fixture
def repo(make_settings):
    repository = open_store(make_settings(busy_timeout_ms=200))
    yield repository
    repository.close()


@pytest.fixture
def admin(pg_cluster, database):
    """A superuser connection to this test's database."""
    with pg_cluster.admin(dbname(database)) as conn:
        yield conn


def session_setting(repository: PostgresStore, name: str) -> str:
    return repository._run(lambda conn: conn.execute(f"SHOW {name}").fetchone()[0])


# -- choosing the backend ---------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_a_url_passes_through_the_config_and_selects_postgresql(scheme, database, tmp_path):
    url = database.replace("postgresql://", f"{scheme}://")
    settings = load_config(
        ROOT / "config.ini",
        environ={"KVAPP_DATABASE": url, "KVAPP_METRICS_PATH": str(tmp_path / "m.sqlite3")},
    )
    assert settings.database == url
    app = create_app(settings)
    try:
        assert isinstance(app.repository, PostgresStore)
        webtest.TestApp(app).put("/kv/k", b"v", status=201)
    finally:
        app.close()
    assert stored(database, "SELECT key, value FROM kv") == [("k", b"v")]


@pytest.mark.backends("sqlite")
def test_a_path_keeps_sqlite(settings):
    app = create_app(settings)
    try:
        assert type(app.repository) is SQLiteStore
    finally:
        app.close()


def test_other_url_schemes_are_refused():
    with pytest.raises(ConfigError, match="only postgresql:// URLs and file paths"):
        load_config(ROOT / "config.ini", environ={"KVAPP_DATABASE": "mysql://u:pw@h/db"})


def test_redact_hides_only_the_password():
    assert redact("postgresql://kv:s3cret@db:5432/kv?sslmode=require") == (
        "postgresql://kv:***@db:5432/kv?sslmode=require"
    )
    assert redact("postgresql://kv@db/kv") == "postgresql://kv@db/kv"
    assert redact("/srv/kv.sqlite3") == "/srv/kv.sqlite3"


def test_metrics_file_for_a_url_is_in_the_temp_folder_whatever_the_password(tmp_path):
    one = metrics_path("postgresql://kv:one@db/kv")
    assert one == metrics_path("postgresql://kv:two@db/kv")
    assert one != metrics_path("postgresql://kv@db/other")
    assert Path(one).parent == Path(tempfile.gettempdir())
    assert metrics_path("postgresql://kv@db/kv", str(tmp_path / "m")) == str(tmp_path / "m")


# -- the schema ---------------------------------------------------------------------------


def test_first_start_creates_the_schema_with_a_version(repo, database):
    assert stored(database, "SELECT name, value FROM meta ORDER BY name") == [
        ("history_floor", 0),
        ("revision", 0),
        ("schema_version", 2),
    ]
    columns = stored(
        database,
        "SELECT column_name, data_type, collation_name FROM information_schema.columns"
        " WHERE table_name = 'kv' ORDER BY ordinal_position",
    )
    assert columns == [
        ("key", "text", "C"),
        ("value", "bytea", None),
        ("content_type", "text", None),
        ("revision", "bigint", None),
        ("expires_at", "bigint", None),
    ]
    indexes = stored(database, "SELECT indexname FROM pg_indexes WHERE tablename = 'kv'")
    assert sorted(indexes) == [("kv_expires_at",), ("kv_pkey",)]


def test_a_second_start_keeps_data_and_revision(make_settings, database):
    first = open_store(make_settings())
    first.set_many([("a", b"1", TEXT)])
    first.close()
    second = open_store(make_settings())
    try:
        assert second.get("a").value == b"1"
        assert second.set_many([("b", b"2", TEXT)]) == 2
    finally:
        second.close()
    assert stored(database, "SELECT count(*) FROM meta") == [(3,)]


def test_a_version_1_database_is_upgraded_in_place(repo, admin, make_settings, database):
    # Version 1, as the first releases made it: no change log.
    repo.set_many([("a", b"1", TEXT)])
    repo.close()
    admin.execute("DROP TABLE changes")
    admin.execute("DELETE FROM meta WHERE name = 'history_floor'")
    admin.execute("UPDATE meta SET value = 1 WHERE name = 'schema_version'")
    upgraded = open_store(make_settings())
    try:
        # Its history starts at its revision: resuming from before it is not possible.
        assert upgraded.history((0, 0), "", 10) == History(1, 1, [])
        upgraded.set_many([("b", b"2", TEXT)])
        assert [event.key for event in upgraded.history((1, WHOLE), "", 10).events] == ["b"]
    finally:
        upgraded.close()
    assert stored(database, "SELECT value FROM meta WHERE name = 'schema_version'") == [(2,)]


def test_another_schema_version_is_refused_with_one_line(repo, admin, database):
    admin.execute("UPDATE meta SET value = 3 WHERE name = 'schema_version'")
    # trust authentication ignores the password, which must not be shown
    url = database.replace("kvapp@", "kvapp:s3cret@")
    with pytest.raises(DatabaseUnusable) as caught:
        PostgresStore(url)
    message = str(caught.value)
    assert message == (
        f"cannot use database {url.replace('s3cret', '***')}: its schema version is 3,"
        " this kvapp knows 2; use a matching kvapp version"
    )


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TABLE kv (key TEXT PRIMARY KEY, body TEXT)",
        "CREATE TABLE meta (name TEXT)",
        # a kv table of the right shape but ordered by the locale, not by bytes
        'CREATE TABLE kv (key TEXT COLLATE "POSIX" PRIMARY KEY, value BYTEA, content_type TEXT,'
        " revision BIGINT, expires_at BIGINT); CREATE TABLE meta (name TEXT, value BIGINT)",
    ],
)
def test_tables_kvapp_did_not_create_are_refused(admin, database, sql):
    admin.execute(sql)
    with pytest.raises(DatabaseUnusable, match="that kvapp did not create; choose another"):
        PostgresStore(database)


def test_a_database_not_in_utf8_is_refused(pg_cluster):
    with pg_cluster.admin() as conn:
        conn.execute("DROP DATABASE IF EXISTS latin1")
        conn.execute(
            "CREATE DATABASE latin1 ENCODING 'LATIN1' TEMPLATE template0"
            " LC_COLLATE 'C' LC_CTYPE 'C'"
        )
    with pytest.raises(DatabaseUnusable, match="its encoding is LATIN1; create the database"):
        PostgresStore(pg_cluster.url("latin1"))


def test_a_read_only_database_is_refused_at_start(admin, database):
    admin.execute(f"ALTER DATABASE {dbname(database)} SET default_transaction_read_only = on")
    with pytest.raises(DatabaseUnusable, match="it is read-only .*; point kvapp at the primary"):
        PostgresStore(database)


# free_port() binds port 0 and closes it: a port where nothing listens.
closed_port = free_port


def test_an_unreachable_server_is_refused_with_one_clean_line():
    port = closed_port()
    url = f"postgresql://kvapp:s3cret@127.0.0.1:{port}/kv"
    with pytest.raises(DatabaseUnusable) as caught:
        PostgresStore(url, busy_timeout_ms=1000)
    message = str(caught.value)
    # libpq's first line (what failed, where) and its hint, whitespace collapsed.
    assert message == (
        f"cannot use database {redact(url)}: cannot connect (connection to server at"
        f' "127.0.0.1", port {port} failed: Connection refused; Is the server running on'
        " that host and accepting TCP/IP connections?); check that the server runs and that"
        " the URL, user and password are right"
    )
    assert "s3cret" not in message


def test_a_server_unreachable_at_every_address_is_one_line_that_counts_them():
    ports = closed_port(), closed_port()
    url = f"postgresql://kvapp@127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}/kv"
    with pytest.raises(DatabaseUnusable) as caught:
        PostgresStore(url, busy_timeout_ms=1000)
    message = str(caught.value)
    assert "\n" not in message and "\t" not in message
    assert f'"127.0.0.1", port {ports[1]} failed: Connection refused; Is the server' in message
    assert "accepting TCP/IP connections?; 2 connection attempts failed);" in message


@pytest.mark.slow
def test_python_m_kvapp_serve_refuses_an_unreachable_server_with_one_clean_line(tmp_path):
    port = closed_port()
    url = f"postgresql://kvapp@127.0.0.1:{port}/kv"
    result = subprocess.run(
        [sys.executable, "-m", "kvapp", "serve", "--port", "0", "--database", url],
        cwd=ROOT, env=server_environ(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "\t" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"kvapp: cannot use database {url}: cannot connect (")
    assert f'"127.0.0.1", port {port} failed: Connection refused; Is the server' in result.stderr


@pytest.mark.slow
def test_waitress_serve_refuses_an_unreachable_server_with_one_line(tmp_path):
    url = f"postgresql://kvapp:s3cret@127.0.0.1:{closed_port()}/kv"
    env = {**server_environ(), "KVAPP_DATABASE": url}
    waitress = str(Path(sys.executable).with_name("waitress-serve"))
    result = subprocess.run(
        [waitress, "--port=0", "wsgi:app"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"kvapp: cannot use database {redact(url)}: cannot connect")
    assert "s3cret" not in result.stderr and "Traceback" not in result.stderr


# -- byte order of keys ----------------------------------------------------------------------

ORDERED = ["", "A", "Z", "a", "a/b", "ab", "z", "\x7f", "é", "ê", "\u07ff", "\u0800", "\ud7ff",
           "\ue000", "\uffff", "\U00010000", "\U0010ffff"]  # fmt: skip


def test_keys_list_in_utf8_byte_order_whatever_the_locale(pg_cluster):
    # A database whose default collation (ICU's English) sorts "a" < "B" < "é" < "z":
    # the listing must not follow it.
    with pg_cluster.admin() as conn:
        conn.execute("DROP DATABASE IF EXISTS localized")
        conn.execute(
            "CREATE DATABASE localized TEMPLATE template0 ENCODING 'UTF8' LOCALE 'C'"
            " LOCALE_PROVIDER icu ICU_LOCALE 'en'"
        )
        with pg_cluster.admin("localized") as local:
            words = ["z", "B", "é", "a"]
            in_locale = local.execute(
                "SELECT w FROM unnest(%s::text[]) AS w ORDER BY w", (words,)
            ).fetchall()
            assert [row[0] for row in in_locale] == ["a", "B", "é", "z"]
    repository = PostgresStore(pg_cluster.url("localized"))
    keys = [f"k{key}" for key in ORDERED]
    try:
        repository.set_many([(key, b"", TEXT) for key in reversed(keys)])
        assert repository.list_keys("k", None, 100).keys == sorted(keys, key=str.encode)
        assert repository.list_keys("k", None, 100).keys == keys
        assert repository.list_keys("ka", None, 100).keys == ["ka", "ka/b", "kab"]
        assert repository.list_keys("k", "kz", 100).keys == keys[keys.index("kz") + 1 :]
    finally:
        repository.close()


@hypothesis_settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=30)
@given(
    keys=st.lists(
        st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=8),
        min_size=1,
        max_size=20,
        unique=True,
    ),
    prefix=st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=2),
)
def test_listing_any_keys_matches_python_byte_order(repo, keys, prefix):
    repo.set_many([(key, b"", TEXT) for key in keys])
    expected = sorted(
        (key for key in repo.list_keys("", None, 10_000).keys if key.startswith(prefix)),
        key=str.encode,
    )
    assert repo.list_keys(prefix, None, 10_000).keys == expected
    assert set(keys) <= set(repo.list_keys("", None, 10_000).keys)


def plan(admin, sql: str, params: tuple) -> str:
    # On a tiny table a sequential or bitmap scan is cheapest; forbid them to
    # see whether the index can serve the query in order (it cannot when the
    # collations differ).
    admin.execute("SET enable_seqscan = off")
    admin.execute("SET enable_bitmapscan = off")
    rows = admin.execute(f"EXPLAIN {sql}", params).fetchall()
    return "\n".join(row[0] for row in rows)


@pytest.mark.parametrize(
    ("prefix", "after"), [("", None), ("a", None), ("a", "ab"), ("", "x"), ("\U0010ffff", None)]
)
def test_listing_is_an_index_range_scan(repo, admin, prefix, after, monkeypatch):
    statements = []
    real = repo._read

    def spy(sql, params, binary=False):
        statements.append((sql, params))
        return real(sql, params, binary)

    monkeypatch.setattr(repo, "_read", spy)
    repo.list_keys(prefix, after, 10)
    sql, params = statements[-1]
    query_plan = plan(admin, sql, params)
    assert "Index Scan using kv_pkey on kv" in query_plan, query_plan
    assert re.search(r"Index Cond: \(+key >", query_plan), query_plan
    assert "Sort" not in query_plan and "Seq Scan" not in query_plan, query_plan


def test_purge_uses_the_expiry_index(repo, admin):
    query_plan = plan(
        admin,
        "SELECT key FROM kv WHERE expires_at <= %s ORDER BY expires_at LIMIT %s",
        (0, 1),
    )
    assert "kv_expires_at" in query_plan and "Seq Scan" not in query_plan, query_plan


# -- sessions ------------------------------------------------------------------------------


def test_sessions_commit_synchronously_whatever_the_server_default(admin, database, make_settings):
    admin.execute(f"ALTER DATABASE {dbname(database)} SET synchronous_commit = off")
    full = open_store(make_settings(busy_timeout_ms=1234))
    normal = open_store(make_settings(synchronous="NORMAL"))
    try:
        assert session_setting(full, "synchronous_commit") == "on"
        assert session_setting(full, "lock_timeout") == "1234ms"
        assert session_setting(normal, "synchronous_commit") == "off"
    finally:
        full.close()
        normal.close()


def test_remote_apply_is_kept(admin, database, make_settings):
    admin.execute(f"ALTER DATABASE {dbname(database)} SET synchronous_commit = remote_apply")
    repository = open_store(make_settings())
    try:
        assert session_setting(repository, "synchronous_commit") == "remote_apply"
    finally:
        repository.close()


def test_sessions_bound_statements_and_watch_the_connection(make_settings):
    repository = open_store(make_settings(database_timeout_seconds=4))
    try:
        assert session_setting(repository, "statement_timeout") == "4s"
        given = repository._run(lambda conn: conn.info.get_parameters())
        assert {name: given.get(name) for name in TCP_SETTINGS} == {
            "keepalives": "1",
            "keepalives_idle": "2",
            "keepalives_interval": "1",
            "keepalives_count": "3",
            "tcp_user_timeout": "4000",
        }
    finally:
        repository.close()


def test_keepalives_and_tcp_user_timeout_of_the_url_are_kept(make_settings, database):
    url = f"{database}?keepalives_idle=30&tcp_user_timeout=60000"
    repository = open_store(make_settings(), url)
    try:
        given = repository._run(lambda conn: conn.info.get_parameters())
        assert given["keepalives_idle"] == "30" and given["tcp_user_timeout"] == "60000"
        assert given["keepalives_count"] == "3"
    finally:
        repository.close()


TCP_SETTINGS = (
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
)


# -- errors ----------------------------------------------------------------------------------


def hold_write_lock(admin) -> None:
    """Take the revision lock every write transaction needs, as another kvapp host would."""
    admin.execute("BEGIN")
    admin.execute("SELECT value FROM meta WHERE name = 'revision' FOR UPDATE")


def test_lock_held_elsewhere_raises_storage_busy_and_reads_work(repo, admin, database):
    repo.set_many([("a", b"1", TEXT)])
    hold_write_lock(admin)
    with pytest.raises(StorageBusy) as caught:
        repo.set_many([("a", b"2", TEXT), ("b", b"2", TEXT)])
    assert str(caught.value) == (
        "the database is locked by another process: nothing was stored; retry"
    )
    with pytest.raises(StorageBusy):
        repo.check_health()
    assert repo.get("a").value == b"1"  # MVCC: readers do not wait for writers
    admin.execute("ROLLBACK")
    assert stored(database, "SELECT key, value FROM kv") == [("a", b"1")]
    repo.set_many([("b", b"2", TEXT)])
    repo.check_health()
    assert repo.get("b").value == b"2"


def test_writes_wait_out_a_lock_held_elsewhere_longer_than_a_stall(make_settings, admin, database):
    # Another kvapp host holding the write lock is not a stalled server: writes
    # wait for it up to busy_timeout_ms, queued ones too, and none is given up.
    repository = open_store(make_settings(busy_timeout_ms=20_000))
    try:
        repository.set_many([("a", b"1", TEXT)])
        hold_write_lock(admin)
        revisions: list[object] = []

        def write(n: int) -> None:
            try:
                revisions.append(repository.set_many([(f"k{n}", b"v", TEXT)]))
            except Exception as exc:  # noqa: BLE001 - the assertion shows it
                revisions.append(exc)

        writers = [threading.Thread(target=write, args=(n,)) for n in range(4)]
        for writer in writers:
            writer.start()
        deadline = time.monotonic() + 3 * STALLED_AFTER
        while time.monotonic() < deadline:
            assert not revisions and not repository._group_commit.stalled_now()
            time.sleep(0.05)
        admin.execute("ROLLBACK")
        for writer in writers:
            writer.join(20)
        assert sorted(revisions) == [2, 3, 4, 5]  # one revision per write
    finally:
        repository.close()


def test_lock_held_elsewhere_is_503_with_retry_after(make_settings, admin):
    app = create_app(make_settings(busy_timeout_ms=100))
    client = webtest.TestApp(app)
    try:
        client.put("/kv/a", b"1", status=201)
        hold_write_lock(admin)
        response = client.put("/kv/a", b"2", status=503)
        assert response.headers["Retry-After"] == "1"
        assert "locked" in client.get("/healthz", status=503).text
        assert client.get("/kv/a").body == b"1"
        admin.execute("ROLLBACK")
        client.put("/kv/a", b"2", status=204)
        client.get("/healthz", status=200)
    finally:
        app.close()


def test_a_statement_canceled_on_the_server_is_503_and_stores_nothing(
    make_settings, admin, pg_cluster, database
):
    app = create_app(make_settings(busy_timeout_ms=30_000))
    client = webtest.TestApp(app)
    answers = []
    try:
        client.put("/kv/a", b"1", status=201)
        hold_write_lock(admin)
        writer = threading.Thread(
            target=lambda: answers.append(client.put("/kv/a", b"2", expect_errors=True))
        )
        writer.start()
        with pg_cluster.admin(dbname(database)) as operator:
            deadline = time.monotonic() + 20
            while True:
                waiting = operator.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = 'kvapp'"
                    " AND wait_event_type = 'Lock'"
                ).fetchall()
                if waiting or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            assert len(waiting) == 1
            operator.execute("SELECT pg_cancel_backend(%s)", waiting[0])
        writer.join(20)
        (response,) = answers
        assert response.status_int == 503
        assert response.headers["Retry-After"] == "1"
        assert response.text == (
            "the database server canceled the statement (statement_timeout, or an operator):"
            " nothing was stored; retry\n"
        )
        admin.execute("ROLLBACK")
        assert stored(database, "SELECT value FROM kv WHERE key = 'a'") == [(b"1",)]
        client.put("/kv/a", b"3", status=204)
    finally:
        app.close()


def terminate_sessions(admin, database: str) -> int:
    """End every session of kvapp on the database, as a failover or a restart does."""
    rows = admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = %s AND application_name = 'kvapp'",
        (dbname(database),),
    ).fetchall()
    return len(rows)


def test_read_only_database_refuses_writes_with_503_and_serves_reads(
    make_settings, admin, database
):
    app = create_app(make_settings())
    client = webtest.TestApp(app)
    try:
        client.put("/kv/a", b"1", status=201)
        # As after a failover to a standby: new sessions are read-only.
        admin.execute(f"ALTER DATABASE {dbname(database)} SET default_transaction_read_only = on")
        assert terminate_sessions(admin, database) >= 1
        response = client.put("/kv/a", b"2", status=503)
        assert response.text == "the database is read-only: nothing was stored\n"
        assert "read-only" in client.get("/healthz", status=503).text
        assert client.get("/kv/a").body == b"1"
        admin.execute(f"ALTER DATABASE {dbname(database)} RESET default_transaction_read_only")
        terminate_sessions(admin, database)
        client.put("/kv/a", b"2", status=204)
        assert client.get("/kv/a").body == b"2"
    finally:
        app.close()


def test_stale_pooled_connections_are_replaced_without_an_error(repo, admin, database):
    repo.set_many([("a", b"1", TEXT)])
    for _ in range(3):
        assert terminate_sessions(admin, database) >= 1
        assert repo.get("a").value == b"1"
        terminate_sessions(admin, database)
        repo.set_many([("a", b"1", TEXT)])


@pytest.mark.parametrize("dead", [1, RECONNECTS, RECONNECTS + 1])
def test_connections_found_dead_before_commit_are_replaced_up_to_a_bound(
    repo, admin, monkeypatch, dead
):
    # A restart kills the pooled connections and also those the pool was
    # opening meanwhile: the first new connection can be dead too.
    repo.set_many([("a", b"1", TEXT)])
    pool = repo._pool()
    getconn, handed = pool.getconn, []

    def dying(*args, **kwargs):
        conn = getconn(*args, **kwargs)
        if len(handed) < dead:  # its backend ends before it is used (waited for, 5 s at most)
            assert admin.execute(
                "SELECT pg_terminate_backend(%s, 5000)", (conn.info.backend_pid,)
            ).fetchone() == (True,)
        handed.append(conn)
        return conn

    monkeypatch.setattr(pool, "getconn", dying)
    if dead <= RECONNECTS:
        repo.set_many([("a", b"2", TEXT)])
        assert len(handed) == dead + 1
    else:
        with pytest.raises(StorageUnavailable, match="^the database server cannot be reached"):
            repo.set_many([("a", b"2", TEXT)])
        assert len(handed) == RECONNECTS + 1
    monkeypatch.undo()
    assert repo.get("a").value == (b"2" if dead <= RECONNECTS else b"1")


def test_a_batch_given_up_as_stalled_is_not_run_again_when_its_connection_breaks(
    repo, admin, database
):
    # Its other writes were answered "may or may not be stored" when it was given
    # up.  Run again on a new connection, it committed when a partition healed,
    # seconds after those answers (tests/test_partition.py caught it).
    admin.execute("CREATE TABLE sleepy (on_ boolean); INSERT INTO sleepy VALUES (true)")
    admin.execute(
        SLOW_TRIGGER.replace("pg_sleep(60)", "pg_sleep((SELECT 60 * on_::int FROM sleepy))")
    )

    def break_it_once_given_up() -> None:
        assert wait_for(repo._group_commit.stalled_now)
        admin.execute("UPDATE sleepy SET on_ = false")  # a second run would commit at once
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
        )

    breaker = threading.Thread(target=break_it_once_given_up)
    breaker.start()
    try:
        with pytest.raises(StorageUnavailable) as caught:
            repo.set_many([("slow", b"x", TEXT)])
    finally:
        breaker.join(timeout=60)
    assert "nothing was stored" in str(caught.value)
    assert stored(database, "SELECT key FROM kv") == []
    assert repo.set_many([("slow", b"y", TEXT)]) >= 1  # the store goes on


def test_runs_again_on_new_connections_share_one_bound(repo, database):
    # A query that hangs, then loses its connection, runs again: in all it
    # waits database_timeout_seconds (2 here) plus the cancel's 1 s, not that
    # much per run.
    bound, stop = 2, threading.Event()

    def end_long_sleeps() -> None:
        with psycopg.connect(database, autocommit=True) as conn:
            while not stop.is_set():
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE wait_event = 'PgSleep' AND now() - query_start > interval '1.4 s'"
                )
                time.sleep(0.05)

    ender = threading.Thread(target=end_long_sleeps)
    ender.start()
    start = time.monotonic()
    try:
        with pytest.raises(StorageUnavailable) as caught:
            repo._run(lambda conn: conn.execute("SELECT pg_sleep(5)"), bound, writing=False)
    finally:
        stop.set()
        ender.join(timeout=30)
    assert time.monotonic() - start < bound + 1 + 1.5  # each run waiting its own bound: 5.6 s
    assert str(caught.value) == f"the database server did not answer within {bound} s; retry"


SLOW_TRIGGER = """
CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.key = 'slow' THEN PERFORM pg_sleep(60); END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER slow BEFORE INSERT OR UPDATE ON kv FOR EACH ROW EXECUTE FUNCTION slow();
"""


def test_connection_lost_mid_batch_stores_nothing_and_the_pool_reconnects(repo, admin, database):
    repo.set_many([("a", b"old", TEXT)])
    admin.execute(SLOW_TRIGGER)
    killed = []

    def kill_sleepers() -> None:
        # The batch is mid-way: its upserts of a (and maybe b) are done, slow's sleeps.
        # Each retry on a fresh connection sleeps again and is ended again.
        with psycopg.connect(database, autocommit=True) as conn:
            deadline = time.monotonic() + 30
            while len(killed) < RECONNECTS + 1 and time.monotonic() < deadline:
                pids = conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
                ).fetchall()
                for (pid,) in pids:
                    conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
                    killed.append(pid)
                time.sleep(0.01)

    killer = threading.Thread(target=kill_sleepers)
    killer.start()
    try:
        with pytest.raises(StorageUnavailable) as caught:
            repo.apply_batch(
                [
                    Write.of(Put("a", b"new", TEXT), Put("b", b"new", TEXT)),
                    Write.of(Put("slow", b"x", TEXT)),
                    Write.of(Put("c", b"new", TEXT)),
                ]
            )
    finally:
        killer.join(timeout=60)
    assert len(killed) == RECONNECTS + 1
    assert str(caught.value) == UNREACHABLE
    assert stored(database, "SELECT key, value FROM kv") == [("a", b"old")]
    assert stored(database, "SELECT value FROM meta WHERE name = 'revision'") == [(1,)]
    admin.execute("DROP TRIGGER slow ON kv")
    assert repo.set_many([("b", b"after", TEXT)]) == 2
    assert repo.get("a").value == b"old" and repo.get("b").value == b"after"


def test_commit_unknown_is_its_own_message():
    # Said when the connection breaks after COMMIT was sent: the client must check.
    assert "may or may not be stored" in COMMIT_UNKNOWN


@needs_root
def test_disk_full_is_507_stores_nothing_and_recovers(make_settings, admin, database, tmp_path):
    # The kv table (with its TOAST table) moves to a tablespace on a 2 MiB
    # tmpfs; the ballast is space we give back while kvapp serves.
    require_tool("mount")
    # Not under tmp_path: the server's user must reach the tablespace's folder.
    disk = Path(tempfile.mkdtemp(prefix="kvapp-small-disk-"))
    disk.chmod(0o755)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(disk)],
        check=True,
        capture_output=True,
    )
    try:
        space = disk / "pg"
        space.mkdir()
        owner = server_owner()
        if owner is not None:
            os.chown(space, *owner)
        ballast = disk / "ballast"
        ballast.write_bytes(b"\0" * 1024 * 1024)
        app = create_app(make_settings())
        client = webtest.TestApp(app)
        try:
            admin.execute(f"CREATE TABLESPACE small_{dbname(database)} LOCATION '{space}'")
            admin.execute(f"ALTER TABLE kv SET TABLESPACE small_{dbname(database)}")
            acknowledged = {}
            for n in range(200):
                value = random.randbytes(20_000)  # incompressible: TOAST stores it whole
                response = client.put(f"/kv/k{n}", value, expect_errors=True)
                if response.status_int != 201:
                    break
                acknowledged[f"k{n}"] = value
            assert response.status_int == 507, response
            assert response.body == FULL_BODY
            # A multi-pair /set that needs new pages is refused whole.
            letters = "".join(random.choices("abcdefghijklmnopqrstuvwxyz", k=30_000))
            client.post("/set", {"x": "1", "y": letters}, status=507)
            assert client.get("/healthz").status_int == 200  # PostgreSQL cannot tell in advance
            for key, value in acknowledged.items():
                assert client.get(f"/kv/{key}").body == value
            client.get("/kv/x", status=404)
            ballast.unlink()
            client.post("/set", {"x": "1", "y": letters}, status=200)
            assert client.get("/get?key=y").text == letters
            client.put(f"/kv/k{n}", value, status=201)
        finally:
            app.close()
            admin.execute("DROP TABLE kv")
            admin.execute(f"DROP TABLESPACE small_{dbname(database)}")
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)
        disk.rmdir()


# -- concurrency under other isolation levels ---------------------------------------------


@pytest.mark.parametrize("isolation", ["serializable", "repeatable read"])
def test_one_winner_among_conditional_writers_at_any_isolation(
    admin, database, make_settings, isolation
):
    admin.execute(
        f"ALTER DATABASE {dbname(database)} SET default_transaction_isolation = '{isolation}'"
    )
    repository = open_store(make_settings(threads=12))
    try:
        for round_number in range(3):
            key = f"race{round_number}"
            revision = repository.set_many([(key, b"start", TEXT)])
            barrier = threading.Barrier(10)
            results = []

            def write(n, key=key, revision=revision, barrier=barrier, results=results):
                condition = Condition(if_match=frozenset({revision}))
                barrier.wait(timeout=30)
                try:
                    results.append(
                        repository.apply(Write.of(Put(key, b"%d" % n, TEXT, None, condition)))
                    )
                except ConditionFailed as exc:
                    results.append(exc)

            threads = [threading.Thread(target=write, args=(n,)) for n in range(10)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            winners = [r for r in results if not isinstance(r, ConditionFailed)]
            assert len(results) == 10 and len(winners) == 1, results
            assert repository.get(key).revision == winners[0].revision
        assert session_setting(repository, "transaction_isolation") == isolation
    finally:
        repository.close()


def test_a_forked_worker_opens_its_own_connections(repo):
    repo.set_many([("parent", b"1", TEXT)])  # the parent's pool is open
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, 3.12+
        pid = os.fork()
    if pid == 0:  # the child: use the store, then leave without cleaning up
        try:
            ok = repo.get("parent").value == b"1"
            repo.set_many([("child", b"2", TEXT)])
            repo.close()
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's pooled connections were neither used nor closed by the child.
    assert repo.get("child").value == b"2"
    assert repo.set_many([("parent", b"3", TEXT)]) == 3


# -- the server goes away while kvapp serves ----------------------------------------------


@pytest.fixture
def own_cluster():
    """A PostgreSQL server of this test's own, which it may stop and start."""
    with running_cluster() as cluster:
        yield cluster


def healthy(server) -> bool:
    client = Client(server.port)
    try:
        return client.get("/healthz")[0] == 200
    finally:
        client.close()


def wait_for(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_server_killed_gives_503_then_kvapp_recovers_without_a_restart(own_cluster, server_factory):
    url = own_cluster.create_database()
    server = server_factory(path=url)  # default settings
    client = Client(server.port)
    assert client.request("PUT", "/kv/a", b"before")[0] == 201
    assert client.get("/set?b=1&c=2")[0] == 200

    own_cluster.stop("immediate")  # a crash: no shutdown checkpoint, sessions cut
    for method, target, body in [
        ("GET", "/kv/a", None),
        ("PUT", "/kv/a", b"during"),
        ("GET", "/set?d=1", None),
        ("GET", "/kv/", None),
        ("GET", "/healthz", None),
    ]:
        status, headers, answer = client.request(method, target, body)
        assert status == 503, (method, target, status, answer)
        assert int(headers["retry-after"]) >= 1
        assert answer.count(b"\n") == 1 and b"database server cannot be reached" in answer
        # Only a write's answer says that nothing of it was stored.
        writes = method == "PUT" or target.startswith("/set")
        assert (b"nothing was stored" in answer) == writes, (method, target, answer)
    assert server.proc.poll() is None

    own_cluster.start()  # recovery replays the WAL
    assert wait_for(lambda: client.get("/healthz")[0] == 200), server.output()
    assert client.get("/kv/a")[::2] == (200, b"before")
    assert client.get("/get?key=c")[::2] == (200, b"2")
    assert client.get("/get?key=d")[0] == 404  # refused with 503: not stored
    assert client.request("PUT", "/kv/a", b"after")[0] == 204
    assert client.get("/kv/a")[::2] == (200, b"after")
    assert server.proc.poll() is None  # the same kvapp process all along
    client.close()


@pytest.mark.slow
def test_server_crashes_under_concurrent_writes_lose_nothing_acknowledged(
    own_cluster, server_factory, summary
):
    url = own_cluster.create_database()
    server = server_factory(env={"KVAPP_BUSY_TIMEOUT_MS": "500"}, path=url)
    rounds, threads_per_round = 3, 4
    acknowledged: set[int] = set()
    answered: dict[int, int] = {}
    lock = threading.Lock()
    counter = iter(range(10**9))
    stop = threading.Event()

    def writer() -> None:
        client = Client(server.port, timeout=30)
        try:
            while not stop.is_set():
                with lock:
                    rid = next(counter)
                status, _, _ = client.get(f"/set?r{rid}.a={rid}&r{rid}.b={rid}&r{rid}.c={rid}")
                with lock:
                    answered[rid] = status
                    if status == 200:
                        acknowledged.add(rid)
                if status != 200:
                    time.sleep(0.05)
        finally:
            client.close()

    for _ in range(rounds):
        stop.clear()
        threads = [threading.Thread(target=writer) for _ in range(threads_per_round)]
        for thread in threads:
            thread.start()
        time.sleep(random.uniform(0.3, 1.0))
        own_cluster.stop("immediate")
        time.sleep(1.5)  # longer than CONNECTION_WAIT: the writers meet the outage
        own_cluster.start()
        assert wait_for(lambda: healthy(server))
        time.sleep(0.2)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads)

    rows = stored(url, "SELECT key FROM kv")
    by_request: dict[int, set[str]] = {}
    for (key,) in rows:
        rid, _, slot = key[1:].partition(".")
        by_request.setdefault(int(rid), set()).add(slot)
    lost = acknowledged - set(by_request)
    partial = {rid for rid, slots in by_request.items() if slots != {"a", "b", "c"}}
    refused = {rid for rid, status in answered.items() if status != 200}
    assert not lost and not partial
    assert refused, "no request met the crash"
    assert {answered[rid] for rid in refused} == {503}
    assert server.proc.poll() is None
    summary(
        f"[postgres] {rounds} server crashes under {threads_per_round} writers:"
        f" {len(acknowledged)} requests acknowledged, 0 lost, 0 half-applied;"
        f" {len(refused)} refused with 503"
        f" ({len(refused & set(by_request))} of them committed as the server died)"
    )


# -- dump and load: what the data tools move between backends ---------------------------


def test_dump_and_load_keep_every_record_as_it_is(repo):
    from kvapp.store.base import Record

    now_ms = int(time.time() * 1000)
    records = [
        Record("a", b"\x00\xff", "application/octet-stream", 7, None),
        Record("b/é", b"", TEXT, 3, now_ms + 3_600_000),
        Record("\U0010ffff", b"top", TEXT, 12, None),
        Record("expired", b"x", TEXT, 5, now_ms - 1),
    ]
    repo.load(records)
    live = sorted(records[:3], key=lambda record: record.key.encode())
    assert repo.dump(None, 10) == live
    assert repo.dump(None, 1) + repo.dump(live[0].key, 10) == live
    assert repo.set_many([("new", b"1", TEXT)]) == 13  # above every loaded revision
    repo.load([Record("a", b"replaced", TEXT, 2, None)])
    assert repo.get("a") == (b"replaced", TEXT, 2)


@pytest.mark.slow
def test_kvapp_copy_moves_every_record_from_sqlite_to_postgresql_and_back(database, tmp_path):
    from bulk import fill
    from tools import kvapp, one_line_error, rows

    from kvapp.store.base import Record

    later = int(time.time() * 1000) + 7_200_000
    records = [
        Record("binary", bytes(range(256)), "application/octet-stream", 3, None),
        Record("empty", b"", TEXT, 4, later),
        Record("line\u2028separator", "a\u2028b\nc\r\n".encode(), TEXT, 5, None),
        Record("ключ/日本/😀", "значение 😀".encode(), TEXT, 12, later + 2),
        Record("\U0010ffff", b"top", TEXT, 6, None),
    ]
    source = tmp_path / "source.sqlite3"
    fill(source, iter(records))
    result = kvapp("copy", "--from", str(source), "--to", database)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().startswith(f"copied 5 records from {source} to {database}")
    every_row = "SELECT key, value, content_type, revision, expires_at FROM kv ORDER BY key"
    assert stored(database, every_row) == rows(source)
    # 12 taken for the records (the store had none), one more by the load.
    assert stored(database, "SELECT value FROM meta WHERE name = 'revision'") == [(13,)]
    result = kvapp("copy", "--from", str(source), "--to", database)
    assert "already holds keys; give --merge" in one_line_error(result)

    back = tmp_path / "back" / "kv.sqlite3"
    result = kvapp("copy", "--from", database, "--to", str(back))
    assert result.returncode == 0, result.stderr
    assert rows(back) == rows(source)


@pytest.mark.parametrize(
    "url", ["postgresql://kvapp:s3cretpw@[::1/x", "postgresql://kvapp:s3cret%zz@db/x"]
)
def test_a_malformed_url_is_refused_in_one_line_without_its_password(url):
    # libpq's own message quotes the URL, or the part it could not read.
    with pytest.raises(DatabaseUnusable) as caught:
        PostgresStore(url)
    message = str(caught.value)
    assert "s3cret" not in message and "\n" not in message
    assert "the URL is malformed; check its host, port and %-escapes" in message
