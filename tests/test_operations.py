"""Errors as problem details, /healthz, /metrics and /openapi.json, in process (WebTest)."""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
from pathlib import Path

import pytest
import webtest
from hypothesis import given
from hypothesis import strategies as st

from kvapp.store import open_store
from kvapp.store.base import MEDIA_TYPE
from kvapp.store.metricsfile import MetricsStore, metrics_path
from kvapp.store.sqlite import SQLiteStore
from kvapp.web.app import App
from kvapp.web.etags import parse_tags
from kvapp.web.metrics import Metrics
from kvapp.web.responses import BadRequest, prefers_json

ROOT = Path(__file__).resolve().parent.parent
# The tests about the contract of /healthz and /metrics run on PostgreSQL too.
BOTH = pytest.mark.backends("sqlite", "postgres")

# -- content negotiation of errors ---------------------------------------------


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, False),
        ("", False),
        ("*/*", False),
        ("text/plain", False),
        ("application/json", True),
        ("APPLICATION/JSON", True),
        ("application/problem+json", True),
        ("application/*", True),
        ("application/json, text/plain", False),  # a tie keeps the default
        ("text/plain, application/json", False),
        ("application/json, text/plain;q=0.9", True),
        ("text/plain;q=0.5, application/json;q=0.6", True),
        ("application/json;q=0.5, text/plain;q=0.6", False),
        ("application/json;q=0, */*", False),
        ("application/json;q=0", False),
        ("text/*;q=0.1, application/json", True),
        ("text/plain;q=0.1, */*;q=0.9, application/json;q=0.2", True),
        ("*/*;q=0.9, application/json", True),
        ("application/json;q=2", False),  # malformed q: the range is ignored
        ("application/json;q=abc", False),
        ("application/json;q=0.0001", False),
        ("application/json ; Q=0.8, text/plain;q=0.7", True),
        ("application/json;charset=utf-8", True),
        ("text/html, application/json", True),  # text/plain itself is only matched by */* or text/*
        ("application/jsonx", False),
    ],
)
def test_prefers_json(accept, expected):
    assert prefers_json(accept) is expected


ERRORS = [
    ("GET", "/nope", 404),
    ("PUT", "/kv/", 405),
    ("GET", "/kv/%ff", 400),
    ("GET", "/kv/absent", 404),
    ("GET", "/kv/?limit=0", 400),
    ("GET", "/get", 400),
    ("GET", "/delete?key=absent", 404),
    ("PATCH", "/set", 405),
]


@pytest.mark.parametrize(("method", "path", "status"), ERRORS)
def test_errors_are_problem_json_when_json_is_preferred(client, method, path, status):
    response = client.request(
        path, method=method, headers={"Accept": "application/json"}, status=status
    )
    assert response.headers["Content-Type"] == "application/problem+json"
    problem = json.loads(response.body)
    assert set(problem) == {"type", "title", "status", "detail"}
    assert problem["status"] == status
    assert problem["type"] == "about:blank"
    assert problem["title"] == response.status.split(" ", 1)[1]
    assert problem["detail"] and "\n" not in problem["detail"]


@pytest.mark.parametrize(("method", "path", "status"), ERRORS)
@pytest.mark.parametrize("accept", [None, "*/*", "text/plain", "application/json;q=0.1, */*"])
def test_errors_are_one_line_of_text_otherwise(client, method, path, status, accept):
    headers = {"Accept": accept} if accept else {}
    response = client.request(path, method=method, headers=headers, status=status)
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.text.endswith("\n") and response.text.count("\n") == 1


def test_412_413_and_503_are_problem_json_too(make_settings, db_path):
    settings = make_settings(max_value_bytes=1, busy_timeout_ms=50)
    app = App(settings, SQLiteStore(settings.database, busy_timeout_ms=50))
    client = webtest.TestApp(app)
    accept = {"Accept": "application/problem+json"}
    try:
        response = client.put("/kv/k", b"xx", headers=accept, status=413)
        assert json.loads(response.body)["status"] == 413
        response = client.put("/kv/k", b"x", headers={**accept, "If-Match": '"1"'}, status=412)
        assert json.loads(response.body)["title"] == "Precondition Failed"
        locker = sqlite3.connect(db_path, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            response = client.put("/kv/k", b"x", headers=accept, status=503)
            assert response.headers["Retry-After"] == "1"
            assert json.loads(response.body)["status"] == 503
        finally:
            locker.execute("ROLLBACK")
            locker.close()
    finally:
        app.close()


# -- /healthz -------------------------------------------------------------------------


@BOTH
def test_healthz_ok(client):
    response = client.get("/healthz")
    assert (response.status_int, response.text) == (200, "ok\n")
    assert client.head("/healthz").status_int == 200


def test_healthz_writes_nothing(client, db_path):
    client.get("/set?a=1")
    wal = Path(f"{db_path}-wal")
    before = (wal.stat().st_size, db_path.stat().st_size)
    probe = sqlite3.connect(db_path)
    version = probe.execute("PRAGMA data_version").fetchone()[0]
    for _ in range(20):
        client.get("/healthz", status=200)
    assert (wal.stat().st_size, db_path.stat().st_size) == before
    # data_version changes when another connection commits (sqlite.org/pragma.html)
    assert probe.execute("PRAGMA data_version").fetchone()[0] == version
    probe.close()


def test_healthz_503_when_locked_by_another_process(make_settings, db_path):
    settings = make_settings(busy_timeout_ms=50)
    app = App(settings, SQLiteStore(settings.database, busy_timeout_ms=50))
    client = webtest.TestApp(app)
    locker = sqlite3.connect(db_path, isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        response = client.get("/healthz", status=503)
        # A probe is no client's write: its answer does not say "nothing was stored".
        assert response.text == "unhealthy: the database is locked by another process; retry\n"
        assert response.headers["Retry-After"] == "1"
        locker.execute("ROLLBACK")
        client.get("/healthz", status=200)
    finally:
        locker.close()
        app.close()


def test_healthz_503_when_writes_are_refused(client):
    # query_only makes SQLite refuse every write as SQLITE_READONLY, as a read-only file does.
    client.app.repository._writer.execute("PRAGMA query_only = 1")
    response = client.get("/healthz", status=503)
    assert response.text == "unhealthy: the database is read-only\n"
    client.get("/kv/", status=200)
    client.app.repository._writer.execute("PRAGMA query_only = 0")
    client.get("/healthz", status=200)


def test_healthz_503_when_the_disk_is_full(client, monkeypatch):
    monkeypatch.setattr("kvapp.store.sqlite.HEALTH_MIN_FREE_BYTES", 2**62)
    response = client.get("/healthz", status=503)
    assert "disk is full" in response.text


# -- /metrics --------------------------------------------------------------------------

LABELS = r'\{[a-z_]+="(?:[^"\\\n]|\\.)*"(?:,[a-z_]+="(?:[^"\\\n]|\\.)*")*\}'
SAMPLE = re.compile(rf"^([a-z_]+)({LABELS})? (\S+)$")


def scrape(client) -> dict[str, float]:
    """Return {'name{labels}': value} of a /metrics scrape, checking its syntax."""
    response = client.get("/metrics")
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = {}
    for line in response.text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) kvapp_[a-z_]+ ", line), line
            continue
        match = SAMPLE.match(line)
        assert match, line
        samples[f"{match[1]}{match[2] or ''}"] = float(match[3])
    return samples


def requests_total(samples, route, method, code) -> float:
    return samples.get(
        f'kvapp_requests_total{{route="{route}",method="{method}",code="{code}"}}', 0.0
    )


@BOTH
def test_metrics_count_requests_by_route_method_and_code(client):
    before = scrape(client)
    for i in range(3):
        client.put(f"/kv/k{i}", b"v")
    client.get("/kv/k0")
    client.get("/kv/absent", status=404)
    client.get("/set?a=1&b=2")
    client.request("/kv/", method="POST", status=405)
    client.get("/nowhere/at/all", status=404)
    # WebTest's lint refuses unknown methods; waitress passes them on.
    webtest.TestApp(client.app, lint=False).request("/kv/k0", method="BREW", status=405)
    after = scrape(client)

    def delta(route, method, code):
        return requests_total(after, route, method, code) - requests_total(
            before, route, method, code
        )

    assert delta("/kv/{key}", "PUT", 201) == 3
    assert delta("/kv/{key}", "GET", 200) == 1
    assert delta("/kv/{key}", "GET", 404) == 1
    assert delta("/set", "GET", 200) == 1
    assert delta("/kv/", "POST", 405) == 1
    assert delta("unmatched", "GET", 404) == 1
    assert delta("/kv/{key}", "other", 405) == 1
    # the first scrape itself is counted by the second
    assert delta("/metrics", "GET", 200) == 1
    assert after["kvapp_keys"] == 5
    assert after["kvapp_database_bytes"] > 0
    assert after["kvapp_commits_total"] - before.get("kvapp_commits_total", 0) == 4
    batches = 'kvapp_commit_batch_size_bucket{le="1"}'
    assert after[batches] - before.get(batches, 0) == 4


def test_metrics_histograms_are_cumulative_and_consistent(client):
    for _ in range(5):
        client.get("/healthz")
    samples = scrape(client)
    buckets = [
        (key, value)
        for key, value in samples.items()
        if key.startswith('kvapp_request_duration_seconds_bucket{route="/healthz"')
    ]
    values = [value for _, value in buckets]
    assert values == sorted(values)
    assert buckets[-1][0].endswith('le="+Inf"}')
    assert values[-1] == samples['kvapp_request_duration_seconds_count{route="/healthz"}'] == 5
    assert samples['kvapp_request_duration_seconds_sum{route="/healthz"}'] > 0


@BOTH
def test_metrics_keys_gauge_ignores_expired_keys(settings):
    now = [1000.0]
    app = App(settings, open_store(settings, clock=lambda: now[0]))
    client = webtest.TestApp(app)
    try:
        client.put("/kv/a?ttl=5", b"v")
        client.put("/kv/b", b"v")
        assert scrape(client)["kvapp_keys"] == 2
        now[0] += 5
        assert scrape(client)["kvapp_keys"] == 1
    finally:
        app.close()


@BOTH
def test_metrics_are_summed_over_processes_sharing_the_file(make_settings, db_path):
    # Two Apps on one database stand for two worker processes: each counts in
    # its own memory and the shared metrics file sums them at scrape time.
    settings = make_settings()
    first = App(settings, open_store(settings))
    second = App(settings, open_store(settings))
    try:
        one, two = webtest.TestApp(first), webtest.TestApp(second)
        for _ in range(3):
            one.get("/healthz")
        for _ in range(4):
            two.get("/healthz")
        two.app.metrics.flush()  # what its flusher thread does once a second
        samples = scrape(one)
        assert requests_total(samples, "/healthz", "GET", 200) == 7
    finally:
        first.close()
        second.close()


@BOTH
def test_metrics_survive_a_restart(make_settings):
    settings = make_settings()
    app = App(settings, open_store(settings))
    webtest.TestApp(app).get("/healthz")
    app.close()  # saves what is left
    app = App(settings, open_store(settings))
    try:
        samples = scrape(webtest.TestApp(app))
        assert requests_total(samples, "/healthz", "GET", 200) == 1
    finally:
        app.close()


def test_metrics_flush_failure_keeps_the_counts(tmp_path):
    store = MetricsStore(str(tmp_path / "missing-folder" / "m.sqlite3"))
    metrics = Metrics(store)
    metrics.observe_request("/get", "GET", 200, 0.002)
    metrics.observe_commit(3)
    with pytest.raises(Exception, match="database"):
        metrics.flush()
    store.path = str(tmp_path / "m.sqlite3")
    metrics.flush()
    rows = {(metric, labels, le): value for metric, labels, le, value in store.read()}
    assert rows[("kvapp_requests_total", 'route="/get",method="GET",code="200"', "")] == 1
    assert rows[("kvapp_request_duration_seconds", 'route="/get"', "0.0025")] == 1
    assert rows[("kvapp_commit_batch_size", "", "4")] == 1
    assert rows[("kvapp_commit_batch_size", "", "sum")] == 3
    store.close()


def test_an_unusable_metrics_file_is_logged_once_and_its_recovery_too(tmp_path, caplog):
    # Flushed once a second, it logged one line a second for as long as it lasted.
    store = MetricsStore(str(tmp_path / "missing-folder" / "m.sqlite3"))
    metrics = Metrics(store)
    with caplog.at_level(logging.WARNING, logger="kvapp"):
        for _ in range(5):
            metrics.observe_request("/get", "GET", 200, 0.002)
            metrics.flush_in_background()
        store.path = str(tmp_path / "m.sqlite3")
        metrics.flush_in_background()
        metrics.flush_in_background()
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2, messages
    assert messages[0].startswith("metrics not saved yet, will retry every second: ")
    assert messages[1] == "metrics saved again"
    rows = {(metric, labels): value for metric, labels, _, value in store.read()}
    assert rows[("kvapp_requests_total", 'route="/get",method="GET",code="200"')] == 5
    store.close()


def test_metrics_503_when_the_metrics_file_is_unusable(client, db_path):
    client.get("/healthz")
    client.app.metrics.store.close()
    client.app.metrics.store.path = str(db_path.parent / "no" / "such" / "folder" / "m")
    client.get("/metrics", status=503)
    client.get("/healthz", status=200)


# -- /openapi.json ----------------------------------------------------------------------


def test_openapi_is_served_from_the_repository_file(client):
    response = client.get("/openapi.json")
    assert response.headers["Content-Type"] == "application/json"
    assert response.body == (ROOT / "kvapp" / "web" / "openapi.json").read_bytes()
    assert response.json["openapi"].startswith("3.1")


def test_openapi_document_is_valid():
    from openapi_spec_validator import validate

    validate(json.loads((ROOT / "kvapp" / "web" / "openapi.json").read_text()))


def test_openapi_describes_every_route_and_method(app):
    document = json.loads((ROOT / "kvapp" / "web" / "openapi.json").read_text())
    described = {
        (path, method.upper())
        for path, item in document["paths"].items()
        for method in item
        if method != "parameters"
    }
    served = {(path, method) for path, methods in app.routes.items() for method in methods}
    served |= {("/kv/{key}", method) for method in app.key_methods}
    assert described == served


TAG_TEXT = st.text(alphabet=st.sampled_from('"W/, \t*0123456789ax'), max_size=40)


@given(st.text(alphabet=st.characters(max_codepoint=0xFF), max_size=40) | TAG_TEXT)
def test_condition_headers_are_read_or_refused_with_a_400(value):
    for strong in (True, False):
        try:
            tags = parse_tags(value, strong, "If-Match")
        except BadRequest as exc:
            assert str(exc).startswith("If-Match must be * or a list of entity tags")
            continue
        assert tags == "*" or all(isinstance(tag, int) for tag in tags)


def openapi_pattern(schema: str) -> re.Pattern:
    document = json.loads((ROOT / "kvapp" / "web" / "openapi.json").read_text())
    return re.compile(document["components"]["schemas"][schema]["pattern"])


@given(st.text(alphabet=st.sampled_from('ab/;= \t"\\,x'), max_size=30))
def test_openapi_describes_exactly_the_content_types_stored(text):
    stored = MEDIA_TYPE.fullmatch(text) is not None
    assert (openapi_pattern("ContentType").match(text) is not None) == stored


@given(TAG_TEXT)
def test_openapi_describes_exactly_the_condition_headers_read(value):
    try:
        parse_tags(value, False, "If-None-Match")
        read = True
    except BadRequest:
        read = False
    assert (openapi_pattern("EntityTags").match(value) is not None) == read


# A client or a fuzzer validating against openapi.json must not hang on these
# (a backtracking engine, as Python's and JavaScript's are).
@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("schema", "text"),
    [
        ("ContentType", "text/plain" + "; " * 122 + "@"),
        ("ContentType", "a/b;" + " \t" * 125 + "@"),
        ("EntityTags", ", " * 30_000 + "x"),
        ("EntityTags", "," + " " * 60_000 + "x"),
    ],
)
def test_openapi_patterns_refuse_backtracking_input_at_once(schema, text):
    assert openapi_pattern(schema).match(text) is None


@pytest.mark.parametrize(
    ("value", "strong", "tags"),
    [
        ("*", True, "*"),
        (" * ", False, "*"),
        ('"1"', True, {1}),
        ('"1", "22" ,W/"3"', True, {1, 22}),
        ('"1", "22" ,W/"3"', False, {1, 22, 3}),
        ('"01", "x", "", "-1", "1.0"', False, set()),
        ('"*"', True, set()),
        ('"a,b" , "5",,', True, {5}),  # a comma inside a tag; empty list elements
        ("", True, set()),
    ],
)
def test_parse_tags(value, strong, tags):
    assert parse_tags(value, strong, "If-Match") == (tags if tags == "*" else frozenset(tags))


@pytest.mark.parametrize("value", ["1, 2", 'garbage "34" junk', '"1" "2"', 'W/ "1"', '*, "1"'])
def test_a_condition_that_is_not_a_list_of_entity_tags_is_refused(value):
    with pytest.raises(BadRequest, match="must be \\* or a list of entity tags"):
        parse_tags(value, True, "If-Match")


def test_usage_mentions_the_api(client):
    text = client.get("/").text
    assert "/kv/" in text and "/openapi.json" in text and "/delete" in text


def test_metrics_file_sits_beside_the_database(client, db_path):
    client.get("/healthz")
    client.app.metrics.flush()
    assert os.path.exists(db_path.with_name("kv-metrics.sqlite3"))


def test_two_databases_of_one_folder_never_share_a_metrics_file(tmp_path):
    # Sharing one would add one server's counters to the other's /metrics.
    names = ["kv.sqlite3", "kv.db", "kv", "kv.sqlite3.bak"]
    paths = [metrics_path(str(tmp_path / name)) for name in names]
    assert len(set(paths)) == len(names)
    assert not {str(tmp_path / name) for name in names} & set(paths)
    assert all(Path(path).parent == tmp_path for path in paths)


def documented_operations() -> list[tuple[str, str, dict]]:
    document = json.loads((ROOT / "kvapp" / "web" / "openapi.json").read_text())
    return [
        (path.replace("{key}", "k"), method.upper(), operation)
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
        if method != "parameters"
    ]


def test_openapi_describes_the_guard_s_answers_on_every_operation(make_client):
    # A client generated from the document must know that a token may be
    # needed (401) and that a cross-site write is refused (403).
    token = "t" * 32
    locked = make_client(auth_token=token)
    open_ = make_client()
    for path, method, operation in documented_operations():
        documented = set(operation["responses"])
        answer = locked.request(path, method=method, expect_errors=True)
        if path == "/healthz":
            assert answer.status_int == 200 and operation["security"] == [{}]
        else:
            assert (answer.status_int, "401" in documented) == (401, True), (path, method)
        answer = open_.request(
            path, method=method, headers={"Sec-Fetch-Site": "cross-site"}, expect_errors=True
        )
        assert (answer.status_int == 403) == ("403" in documented), (path, method)
