"""Shared fixtures: settings on a temporary database, the app in process, real servers.

Storage backends: a test that depends on the `database` fixture runs on an
SQLite file; a module or test marked `@pytest.mark.backends("sqlite",
"postgres")` runs once on each, the PostgreSQL runs on a fresh database of a
throwaway cluster that the session starts (tests/pgcluster.py).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import webtest
from helpers import ROOT, Clock, Server, running_cluster
from hypothesis import settings as hypothesis_settings

from kvapp import create_app
from kvapp.config import load_config
from kvapp.store import open_store
from kvapp.store.location import is_postgres_url
from kvapp.web.guard import parse_allowed_hosts

BACKENDS = ("sqlite", "postgres")

# .ci/run sets HYPOTHESIS_PROFILE=ci; hypothesis does not read it by itself.
# No deadline: every example commits with synchronous=FULL (an fsync), whose
# time depends on the disk, and tests make no timing assertions.
# ci is derandomized: a CI run is reproducible and writes no example database;
# dev (the default) is random and replays failures from .hypothesis/ (gitignored).
hypothesis_settings.register_profile("dev", deadline=None, max_examples=100)
hypothesis_settings.register_profile(
    "ci", deadline=None, max_examples=300, print_blob=True, derandomize=True, database=None
)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


# Tests send SIGINT to servers and tools they start, which must stop as on
# Ctrl-C.  A shell that starts a job in the background (`cmd &`, nohup) makes
# it ignore SIGINT, children inherit that, and a Python started so never
# raises KeyboardInterrupt: waitress-serve then ignored the signal, and an
# export ran to its end.  Undone here, so that the children start with
# SIGINT's default whatever the machine's shell did (exec resets a handled
# signal to the default).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
# So with SIGHUP, which nohup ignores: kvapp keeps an ignored stop signal
# ignored, as nohup asks, and the SIGHUP tests would fail under it.
if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


# In CI every test must run: FORBID_SKIPS=1 (set by .ci/run) turns a skip
# into a failure, so a missing nginx or PostgreSQL cannot pass silently.
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("FORBID_SKIPS") and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped, but FORBID_SKIPS is set: {report.longrepr}"


@pytest.fixture
def summary(request):
    """Return a function that reports one line of a test's measured figures.

    The lines are printed together at the end of the run.  Printed where the
    test runs, they were lost under pytest-xdist, which does not pass a
    worker's output on; a report's user_properties reach the controller.
    """

    def add(line: str) -> None:
        request.node.user_properties.append(("summary", line))

    return add


_SUMMARIES: list[str] = []


def pytest_runtest_logreport(report):
    if report.when == "call":
        _SUMMARIES.extend(value for name, value in report.user_properties if name == "summary")


def pytest_terminal_summary(terminalreporter):
    if _SUMMARIES:
        terminalreporter.section("measured figures")
        for line in _SUMMARIES:
            terminalreporter.write_line(line)


def pytest_generate_tests(metafunc):
    """Run a test that uses `backend` once per backend its backends marker names."""
    marker = metafunc.definition.get_closest_marker("backends")
    if marker is not None and "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", marker.args or BACKENDS, indirect=True)


@pytest.fixture
def backend(request) -> str:
    """The storage backend of this test: sqlite unless a backends marker says otherwise."""
    return getattr(request, "param", "sqlite")


@pytest.fixture(scope="session")
def pg_cluster():
    """A PostgreSQL server for the whole session, started on first use; removed at the end."""
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "kv.sqlite3"


@pytest.fixture
def database(backend: str, db_path: Path, request) -> str:
    """The database setting of this test: db_path, or the URL of a fresh PostgreSQL database."""
    if backend == "sqlite":
        yield str(db_path)
        return
    cluster = request.getfixturevalue("pg_cluster")
    url = cluster.create_database()
    yield url
    cluster.release_database(url)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_settings(database: str, tmp_path: Path):
    """Return a function building Settings on this test's database, with overrides.

    With PostgreSQL the metrics file goes in tmp_path, so no two tests share one.
    """

    def make(**overrides):
        if is_postgres_url(database):
            overrides.setdefault("metrics_path", str(tmp_path / "metrics.sqlite3"))
        return load_config(ROOT / "config.ini", environ={}, database=database, **overrides)

    return make


@pytest.fixture
def repo(make_settings, clock):
    """The store on this test's database, its time read from clock."""
    repository = open_store(make_settings(), clock=clock)
    yield repository
    repository.close()


@pytest.fixture
def settings(make_settings):
    return make_settings()


@pytest.fixture
def app(settings):
    application = create_app(settings)
    yield application
    application.close()


@pytest.fixture
def client(app) -> webtest.TestApp:
    return webtest.TestApp(app)


@pytest.fixture
def make_client(make_settings):
    """Return a function building a WebTest client (and its app) for settings overrides.

    allowed_hosts may be given as the config file's text.
    """
    apps = []

    def make(**overrides) -> webtest.TestApp:
        if isinstance(overrides.get("allowed_hosts"), str):
            overrides["allowed_hosts"] = parse_allowed_hosts(overrides["allowed_hosts"])
        application = create_app(make_settings(**overrides))
        apps.append(application)
        return webtest.TestApp(application)

    yield make
    for application in apps:
        application.close()


@pytest.fixture
def server_factory(database: str, tmp_path: Path):
    """Return a function that starts Servers (or a subclass) on this test's database.

    All are killed at teardown.  With PostgreSQL their metrics file goes in
    tmp_path, so no two tests share one.
    """
    servers: list[Server] = []

    def start(
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        path: Path | str | None = None,
        prefix: tuple[str, ...] = (),
        kind: type[Server] = Server,
    ) -> Server:
        log_path = tmp_path / f"server-{len(servers)}.log"
        db = path or database
        if is_postgres_url(str(db)):
            env = {"KVAPP_METRICS_PATH": str(tmp_path / "metrics.sqlite3"), **(env or {})}
        server = kind(db, env, args, log_path, prefix).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()


@pytest.fixture
def server(server_factory) -> Server:
    return server_factory()
