"""POST /txn in process (WebTest): every field, every bad input, and a dict model.

Real servers under contention and kill -9 are in test_txn_server.py and
test_txn_crash.py.
"""

from __future__ import annotations

import base64
import io
import json
import sqlite3

import pytest
import webtest
from helpers import stored
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from kvapp.web.app import App

pytestmark = pytest.mark.backends("sqlite", "postgres")
# Input refused before the repository is reached answers the same on both backends.
BEFORE_STORAGE = pytest.mark.backends("sqlite")

JSON_TYPE = "application/json"
TEXT = "text/plain; charset=utf-8"


def txn(client, document, status=200, headers=None, content_type=JSON_TYPE):
    """POST document (a dict, or raw bytes) to /txn; return the WebTest response."""
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    return client.post(
        "/txn", body, headers={"Content-Type": content_type, **(headers or {})}, status=status
    )


@pytest.fixture
def snapshot(database: str):
    """Return a function giving every row and every meta value, read independently."""

    def rows() -> tuple[list, list]:
        return (
            stored(database, "SELECT key, value, content_type, revision, expires_at FROM kv"),
            stored(database, "SELECT name, value FROM meta ORDER BY name"),
        )

    return rows


def stored_value(client, key: str):
    item = client.app.repository.get(key)
    return None if item is None else (item.value, item.content_type, item.revision)


# -- the answer ---------------------------------------------------------------------------------


def test_the_example_of_the_docs_applies_then_and_answers_each_operation(client):
    client.app.repository.set_many([("a", b"old", TEXT), ("b", b"x", TEXT), ("c", b"\xff", "x/y")])
    a_rev = stored_value(client, "a")[2]
    answer = txn(
        client,
        {
            "if": [
                {"key": "a", "etag": f'"{a_rev}"'},
                {"key": "n", "exists": False},
                {"key": "c", "exists": True},
            ],
            "then": [
                {"put": "a", "value": "1", "content_type": "text/plain", "ttl": 30},
                {"put": "z", "value_base64": "AAEC"},
                {"delete": "b"},
                {"get": "c"},
            ],
            "else": [{"get": "a"}],
        },
    ).json
    revision = answer["revision"]
    assert revision == a_rev + 1
    assert answer == {
        "succeeded": True,
        "revision": revision,
        "results": [
            {"put": "a", "etag": f'"{revision}"', "created": False},
            {"put": "z", "etag": f'"{revision}"', "created": True},
            {"delete": "b", "deleted": True},
            {
                "get": "c",
                "found": True,
                "value_base64": "/w==",
                "content_type": "x/y",
                "etag": f'"{a_rev}"',
            },
        ],
    }
    assert stored_value(client, "a") == (b"1", "text/plain", revision)
    assert stored_value(client, "z") == (b"\x00\x01\x02", "application/octet-stream", revision)
    assert stored_value(client, "b") is None


def test_a_failed_condition_runs_else_and_changes_nothing_of_then(client, snapshot):
    client.app.repository.set_many([("a", b"1", TEXT)])
    before = snapshot()
    answer = txn(
        client,
        {
            "if": [{"key": "a", "etag": '"999"'}],
            "then": [{"put": "a", "value": "2"}, {"delete": "b"}],
            "else": [{"get": "a"}, {"get": "missing"}],
        },
    ).json
    assert answer["succeeded"] is False
    assert answer["revision"] == 1  # wrote nothing: the revision it read
    assert answer["results"] == [
        {"get": "a", "found": True, "value": "1", "content_type": TEXT, "etag": '"1"'},
        {"get": "missing", "found": False},
    ]
    assert snapshot() == before


def test_the_else_branch_writes_too(client):
    client.app.repository.set_many([("lock", b"alice", TEXT)])
    answer = txn(
        client,
        {
            "if": [{"key": "lock", "exists": False}],
            "then": [{"put": "lock", "value": "bob"}],
            "else": [{"put": "waiting/bob", "value": "1"}, {"get": "lock"}],
        },
    ).json
    assert answer["succeeded"] is False
    assert answer["revision"] == 2
    assert answer["results"][0] == {"put": "waiting/bob", "etag": '"2"', "created": True}
    assert answer["results"][1]["value"] == "alice"
    assert stored_value(client, "lock")[0] == b"alice"


@pytest.mark.parametrize(
    ("condition", "holds"),
    [
        ({"key": "k", "exists": True}, True),
        ({"key": "k", "exists": False}, False),
        ({"key": "none", "exists": False}, True),
        ({"key": "none", "exists": True}, False),
        ({"key": "k", "etag": '"1"'}, True),
        ({"key": "k", "etag": '"2"'}, False),
        ({"key": "none", "etag": '"1"'}, False),
    ],
)
def test_each_condition(client, condition, holds):
    client.app.repository.set_many([("k", b"v", TEXT)])
    assert txn(client, {"if": [condition]}).json["succeeded"] is holds


def test_all_conditions_must_hold(client):
    client.app.repository.set_many([("a", b"1", TEXT)])
    both = [{"key": "a", "exists": True}, {"key": "b", "exists": True}]
    assert txn(client, {"if": both, "then": [{"put": "c", "value": "x"}]}).json == {
        "succeeded": False,
        "revision": 1,
        "results": [],
    }
    assert stored_value(client, "c") is None


def test_an_expired_key_does_not_exist(timed_client, clock):
    txn(timed_client, {"then": [{"put": "t", "value": "v", "ttl": 5}]})
    assert txn(timed_client, {"if": [{"key": "t", "exists": True}]}).json["succeeded"] is True
    clock.now += 5
    assert txn(timed_client, {"if": [{"key": "t", "exists": False}]}).json["succeeded"] is True
    answer = txn(timed_client, {"then": [{"get": "t"}, {"delete": "t"}]}).json
    assert answer["results"] == [{"get": "t", "found": False}, {"delete": "t", "deleted": False}]


def test_an_empty_transaction_succeeds_and_reads_the_revision(client):
    client.app.repository.set_many([("a", b"1", TEXT)])
    assert txn(client, {}).json == {"succeeded": True, "revision": 1, "results": []}
    assert txn(client, {"if": [], "then": [], "else": []}).json["revision"] == 1


def test_gets_see_the_state_before_the_branch_writes(client):
    """The documented choice: a get of a key the branch puts answers what the put replaces."""
    client.app.repository.set_many([("a", b"old", TEXT)])
    answer = txn(
        client,
        {
            "then": [
                {"put": "a", "value": "new"},
                {"get": "a"},
                {"delete": "b"},
                {"put": "c", "value": "c"},
                {"get": "c"},
            ]
        },
    ).json
    assert answer["results"][1] == {
        "get": "a",
        "found": True,
        "value": "old",
        "content_type": TEXT,
        "etag": '"1"',
    }
    assert answer["results"][4] == {"get": "c", "found": False}
    assert client.get("/kv/a").body == b"new"


def test_all_writes_share_one_revision_and_one_etag(client):
    answer = txn(
        client, {"then": [{"put": "x", "value": "1"}, {"put": "y", "value_base64": ""}]}
    ).json
    assert client.get("/kv/x").headers["ETag"] == client.get("/kv/y").headers["ETag"]
    assert client.get("/kv/x").headers["ETag"] == f'"{answer["revision"]}"'


def test_the_change_log_holds_a_transaction_as_one_revision(client):
    client.app.repository.set_many([("gone", b"1", TEXT)])
    revision = txn(
        client,
        {
            "then": [
                {"put": "p", "value": "1"},
                {"delete": "gone"},
                {"delete": "never"},
                {"put": "q", "value_base64": "/w=="},
            ]
        },
    ).json["revision"]
    events = client.app.repository.history((1, 2**62), "", 100).events
    assert [(e.revision, e.n, e.key, e.kind, e.value) for e in events] == [
        (revision, 0, "p", "put", b"1"),
        (revision, 1, "gone", "delete", None),
        (revision, 2, "q", "put", b"\xff"),
    ]


def test_values_and_defaults(client):
    doc = {
        "then": [
            {"put": "text", "value": "é €\n\u2028"},
            {"put": "bytes", "value_base64": base64.b64encode(bytes(range(256))).decode()},
            {"put": "typed", "value": "{}", "content_type": "application/json"},
            {"put": "empty", "value": ""},
        ]
    }
    txn(client, doc)
    assert stored_value(client, "text")[:2] == ("é €\n\u2028".encode(), TEXT)
    assert stored_value(client, "bytes")[:2] == (bytes(range(256)), "application/octet-stream")
    assert stored_value(client, "typed")[:2] == (b"{}", "application/json")
    assert stored_value(client, "empty")[:2] == (b"", TEXT)
    results = txn(client, {"then": [{"get": "text"}, {"get": "bytes"}, {"get": "empty"}]}).json
    assert results["results"][0]["value"] == "é €\n\u2028"
    assert base64.b64decode(results["results"][1]["value_base64"]) == bytes(range(256))
    assert results["results"][2]["value"] == ""


@pytest.mark.parametrize("ttl", [b"30", b"30.0", b"3e1", b"300e-1"])
def test_a_ttl_sets_the_deadline(timed_client, clock, database, ttl):
    body = b'{"then": [{"put": "t", "value": "v", "ttl": ' + ttl + b"}]}"
    txn(timed_client, body)
    assert stored(database, "SELECT expires_at FROM kv") == [(int(clock.now * 1000) + 30_000,)]


def test_keys_with_any_allowed_characters(client):
    keys = ["a/b c", "é", "\U0001f600", "%41", "x" * 1024]
    txn(client, {"then": [{"put": key, "value": key} for key in keys]})
    answer = txn(client, {"then": [{"get": key} for key in keys]}).json
    assert [result["value"] for result in answer["results"]] == keys


def test_the_answer_is_json_with_no_store(client):
    response = txn(client, {})
    assert response.headers["Content-Type"] == JSON_TYPE
    assert response.headers["Cache-Control"] == "no-store"


def test_metrics_count_it_as_route_txn(client):
    txn(client, {})
    txn(client, b"{", status=400)
    page = client.get("/metrics").text
    assert 'kvapp_requests_total{route="/txn",method="POST",code="200"} 1' in page
    assert 'kvapp_requests_total{route="/txn",method="POST",code="400"} 1' in page


@BEFORE_STORAGE
@pytest.mark.parametrize("query", ["dry_run=1", "ttl=5", "a"])
def test_a_query_string_is_400_and_stores_nothing(client, snapshot, query):
    before = snapshot()
    response = client.post(
        f"/txn?{query}",
        json.dumps({"then": [OK_PUT]}).encode(),
        headers={"Content-Type": JSON_TYPE},
        status=400,
    )
    assert response.text.count("\n") == 1
    assert snapshot() == before


@BEFORE_STORAGE
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "HEAD"])
def test_other_methods_are_405(client, method):
    response = client.request("/txn", method=method, status=405)
    assert response.headers["Allow"] == "POST"


@pytest.fixture
def timed_client(settings, clock):
    from kvapp.store import open_store

    app = App(settings, open_store(settings, clock=clock))
    yield webtest.TestApp(app)
    app.close()


# -- bad input: 400, the field named, nothing stored ---------------------------------------------

OK_PUT = {"put": "k", "value": "v"}

HUGE_TTL = b'{"then": [{"put": "k", "value": "v", "ttl": %s}]}'
BAD = [
    # (document or raw body, field, words in the message)
    (b"", None, "the body is empty"),
    (b" \r\n", None, "the body is empty"),
    (b"{", None, "not valid JSON"),
    (b"{}x", None, "not valid JSON"),
    (b'{"then": [], }', None, "not valid JSON"),
    (b"\xef\xbb\xbf{}", None, "byte order mark"),
    (b'{"then": [{"put": "k", "value": "\xff"}]}', None, "not valid UTF-8"),
    ('{"then": [{"put": "k", "value": "v"}]}'.encode("utf-16"), None, "not valid UTF-8"),
    (b'{"then": [{"put": "k", "value": NaN}]}', None, "NaN"),
    (b'{"if": [{"key": "k", "etag": Infinity}]}', None, "Infinity"),
    (b"[" * 100_000 + b"]" * 100_000, None, "nested too deeply"),
    (b"[]", None, "must be a JSON object"),
    (b'"txn"', None, "must be a JSON object"),
    (b"null", None, "must be a JSON object"),
    (b'{"if": [], "if": []}', "if", "given twice"),
    (b'{"then": [{"put": "k", "put": "j", "value": "v"}]}', "then[0].put", "given twice"),
    (b'{"if": [{"key": "a", "key": "b", "exists": true}]}', "if[0].key", "given twice"),
    ({"when": []}, "when", "unknown member"),
    ({"If": []}, "If", "unknown member"),
    ({"then": [], "a b": 1}, '["a b"]', "unknown member"),
    ({"if": {}}, "if", "must be an array"),
    ({"then": "put"}, "then", "must be an array"),
    ({"else": None}, "else", "must be an array"),
    ({"if": [1]}, "if[0]", "must be an object"),
    ({"if": [{"exists": True}]}, "if[0]", "needs a key"),
    ({"if": [{"key": "a"}]}, "if[0]", "exactly one of etag and exists"),
    ({"if": [{"key": "a", "etag": '"1"', "exists": True}]}, "if[0]", "exactly one of etag"),
    ({"if": [{"key": "a", "exists": 1}]}, "if[0].exists", "true or false"),
    ({"if": [{"key": "a", "exists": "false"}]}, "if[0].exists", "true or false"),
    ({"if": [{"key": "a", "etag": 1}]}, "if[0].etag", "must be a string"),
    ({"if": [{"key": "a", "etag": "1"}]}, "if[0].etag", "ETag"),
    ({"if": [{"key": "a", "etag": 'W/"1"'}]}, "if[0].etag", "ETag"),
    ({"if": [{"key": "a", "etag": '"01"'}]}, "if[0].etag", "ETag"),
    ({"if": [{"key": "a", "etag": '"1", "2"'}]}, "if[0].etag", "ETag"),
    ({"if": [{"key": "a", "etag": "*"}]}, "if[0].etag", "ETag"),
    ({"if": [{"key": "a", "exists": True, "value": "1"}]}, "if[0].value", "unknown member"),
    ({"if": [{"key": 7, "exists": True}]}, "if[0].key", "must be a string"),
    ({"if": [{"key": "", "exists": True}]}, "if[0].key", "empty"),
    ({"then": [OK_PUT, 5]}, "then[1]", "must be an object"),
    ({"then": [{}]}, "then[0]", "exactly one of put, delete and get"),
    ({"then": [{"put": "k", "delete": "k"}]}, "then[0]", "exactly one of put"),
    ({"then": [{"get": "k", "value": "v"}]}, "then[0].value", "not a member of a get"),
    ({"then": [{"delete": "k", "ttl": 5}]}, "then[0].ttl", "not a member of a delete"),
    ({"then": [{"put": "k", "value": "v", "etag": '"1"'}]}, "then[0].etag", "unknown member"),
    ({"then": [OK_PUT, OK_PUT]}, "then[1].put", "already written by then[0]"),
    ({"else": [{"delete": "k"}, OK_PUT]}, "else[1].put", "already written by else[0]"),
    ({"then": [OK_PUT, {"get": "k"}, {"delete": "k"}]}, "then[2].delete", "already written"),
    ({"then": [{"get": "k"}, OK_PUT, {"get": "k"}]}, "then[2].get", "already read by then[0]"),
    ({"if": [{}] * 386}, None, "more than 385 JSON objects"),
    (b'{"then": [' + b"{}," * 1_300_000 + b"{}]}", None, "more than 385 JSON objects"),
    ({"then": [{"put": ""}]}, "then[0].put", "empty"),
    ({"then": [{"delete": "a\nb"}]}, "then[0].delete", "control character"),
    ({"then": [{"get": "\u0085"}]}, "then[0].get", "control character"),
    ({"then": [{"get": "x" * 1025}]}, "then[0].get", "1024"),
    ({"then": [{"get": None}]}, "then[0].get", "must be a string"),
    (b'{"then": [{"get": "\\ud800"}]}', "then[0].get", "surrogate"),
    ({"then": [{"put": "k"}]}, "then[0]", "exactly one of value and value_base64"),
    ({"then": [{"put": "k", "value": "v", "value_base64": ""}]}, "then[0]", "exactly one"),
    ({"then": [{"put": "k", "value": 1}]}, "then[0].value", "must be a string"),
    ({"then": [{"put": "k", "value": ["v"]}]}, "then[0].value", "must be a string"),
    (b'{"then": [{"put": "k", "value": "\\udfff"}]}', "then[0].value", "surrogate"),
    ({"then": [{"put": "k", "value_base64": "AAE"}]}, "then[0].value_base64", "not base64"),
    ({"then": [{"put": "k", "value_base64": "AA="}]}, "then[0].value_base64", "base64"),
    ({"then": [{"put": "k", "value_base64": "AB=="}]}, "then[0].value_base64", "canonical"),
    ({"then": [{"put": "k", "value_base64": "AAB="}]}, "then[0].value_base64", "canonical"),
    ({"then": [{"put": "k", "value_base64": "AA\nEC"}]}, "then[0].value_base64", "not base64"),
    ({"then": [{"put": "k", "value_base64": "AA-_"}]}, "then[0].value_base64", "not base64"),
    ({"then": [{"put": "k", "value_base64": "é"}]}, "then[0].value_base64", "not base64"),
    ({"then": [{"put": "k", "value_base64": 0}]}, "then[0].value_base64", "must be a string"),
    ({"then": [{**OK_PUT, "content_type": "text"}]}, "then[0].content_type", "media type"),
    ({"then": [{**OK_PUT, "content_type": ""}]}, "then[0].content_type", "media type"),
    (
        {"then": [{**OK_PUT, "content_type": "a/b; c=d, text/html"}]},
        "then[0].content_type",
        "media",
    ),
    ({"then": [{**OK_PUT, "content_type": "a/b\r\nX: y"}]}, "then[0].content_type", "media"),
    ({"then": [{**OK_PUT, "content_type": "a/b\n;x"}]}, "then[0].content_type", "media"),
    ({"then": [{**OK_PUT, "content_type": "a/b\u3000;x"}]}, "then[0].content_type", "media"),
    ({"then": [{**OK_PUT, "content_type": "a/b\x85;x"}]}, "then[0].content_type", "media"),
    ({"then": [{**OK_PUT, "content_type": "a/b\x1c;x"}]}, "then[0].content_type", "media"),
    ({"then": [{**OK_PUT, "content_type": "a/" + "b" * 300}]}, "then[0].content_type", "255"),
    ({"then": [{**OK_PUT, "content_type": None}]}, "then[0].content_type", "must be a string"),
    ({"then": [{**OK_PUT, "ttl": 0}]}, "then[0].ttl", "from 1 to"),
    ({"then": [{**OK_PUT, "ttl": -1}]}, "then[0].ttl", "from 1 to"),
    ({"then": [{**OK_PUT, "ttl": 2**31}]}, "then[0].ttl", "from 1 to"),
    ({"then": [{**OK_PUT, "ttl": 1.5}]}, "then[0].ttl", "whole number"),
    ({"then": [{**OK_PUT, "ttl": 2147483648.0}]}, "then[0].ttl", "from 1 to"),
    (b'{"then": [{"put": "k", "value": "v", "ttl": 1e400}]}', "then[0].ttl", "whole number"),
    ({"then": [{**OK_PUT, "ttl": True}]}, "then[0].ttl", "whole number"),
    ({"then": [{**OK_PUT, "ttl": "30"}]}, "then[0].ttl", "must be a JSON number"),
    # Valid JSON, though Python's int() refuses 4,300 digits and more.
    (HUGE_TTL % (b"1" + b"0" * 5000), "then[0].ttl", "whole"),
    (HUGE_TTL % (b"1" + b"0" * 30), "then[0].ttl", "from 1"),
    (b'{"then": [{"put": "k", "value": 1%s}]}' % (b"0" * 5000), "then[0].value", "a number"),
    ({"if": [{"key": "a", "exists": True}] * 129}, "if", "limit is 128 (max_txn_ops)"),
    ({"then": [{"get": "a"}] * 129}, "then", "limit is 128"),
    ({"else": [{"get": "a"}] * 129}, "else", "limit is 128"),
]


@BEFORE_STORAGE
@pytest.mark.parametrize(("document", "field", "words"), BAD)
def test_bad_input_is_400_naming_the_field_and_stores_nothing(
    client, snapshot, document, field, words
):
    client.app.repository.set_many([("k", b"old", TEXT), ("a", b"old", TEXT)])
    before = snapshot()
    response = txn(client, document, status=400)
    line = response.text
    assert line.endswith("\n") and "\n" not in line[:-1]
    assert words in line
    if field is not None:
        assert line.startswith(f"{field}: ")
    problem = txn(client, document, status=400, headers={"Accept": "application/json"})
    assert problem.headers["Content-Type"] == "application/problem+json"
    assert problem.json["status"] == 400
    assert problem.json["detail"] == line[:-1]
    assert problem.json.get("field") == field
    assert snapshot() == before


@BEFORE_STORAGE
def test_128_operations_in_each_branch_are_accepted(client):
    document = {
        "if": [{"key": f"k{i}", "exists": False} for i in range(128)],
        "then": [{"put": f"k{i}", "value": str(i)} for i in range(128)],
        "else": [{"get": f"k{i}"} for i in range(128)],
    }
    answer = txn(client, document).json
    assert answer["succeeded"] is True and len(answer["results"]) == 128
    assert stored_value(client, "k127")[0] == b"127"


@BEFORE_STORAGE
def test_max_txn_ops_is_a_setting(make_client):
    client = make_client(max_txn_ops=2)
    txn(client, {"then": [{"get": "a"}, {"get": "b"}]})
    response = txn(client, {"if": [{"key": "a", "exists": True}] * 3}, status=400)
    assert response.text == "if: holds 3 items; the limit is 2 (max_txn_ops)\n"


@BEFORE_STORAGE
@pytest.mark.parametrize(
    "content_type",
    [
        "",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonx",
        "application/json-seq",
        "application/merge-patch+json",
        "application/json; charset=latin-1",
        "application/json; charset=utf-16",
        "application/json;",
        "application/json; charset = utf-8",
        "application/json; charset=utf-8; x=y",
        "application/json, text/plain",
    ],
)
def test_other_media_types_are_415(client, snapshot, content_type):
    before = snapshot()
    response = txn(client, {"then": [OK_PUT]}, status=415, content_type=content_type)
    assert "application/json" in response.text
    assert snapshot() == before


@BEFORE_STORAGE
@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "Application/JSON",
        "application/json; charset=UTF-8",
        'application/json;charset="utf-8"',
    ],
)
def test_json_with_or_without_utf8_charset_is_accepted(client, content_type):
    txn(client, {"then": [OK_PUT]}, content_type=content_type)
    assert stored_value(client, "k")[0] == b"v"


@BEFORE_STORAGE
def test_gets_that_would_answer_more_than_max_body_bytes_are_400_and_change_nothing(
    make_client, snapshot
):
    client = make_client(max_body_bytes=1000)
    client.app.repository.set_many([("a", b"x" * 600, TEXT), ("b", b"y" * 600, TEXT)])
    before = snapshot()
    document = {"then": [{"get": "a"}, {"put": "c", "value": "1"}, {"get": "b"}]}
    response = txn(client, document, status=400)
    assert response.text == (
        "the gets of this transaction would answer 1200 bytes of values; the limit is 1000"
        " (max_body_bytes); get fewer keys; nothing was changed\n"
    )
    assert snapshot() == before
    # The else branch's gets count only when it runs; a value put earlier counts too.
    document["if"] = [{"key": "a", "exists": True}]
    document["else"] = [{"get": "a"}, {"get": "b"}]
    document["then"] = [{"get": "a"}, {"put": "c", "value": "1"}]
    assert txn(client, document).json["results"][0]["value"] == "x" * 600


@BEFORE_STORAGE
def test_a_value_over_max_value_bytes_is_413_naming_the_field(make_client, snapshot):
    client = make_client(max_value_bytes=4)
    before = snapshot()
    document = {"then": [{"put": "ok", "value": "1234"}, {"put": "k", "value": "12345"}]}
    response = txn(client, document, status=413)
    assert response.text == "then[1].value: the value is 5 bytes; the limit is 4\n"
    document = {"else": [{"put": "k", "value_base64": base64.b64encode(b"12345").decode()}]}
    problem = txn(client, document, status=413, headers={"Accept": "application/json"}).json
    assert problem["field"] == "else[0].value_base64"
    assert snapshot() == before


class Unread(io.BytesIO):
    def read(self, *args):
        raise AssertionError("the body was read")


@BEFORE_STORAGE
@pytest.mark.parametrize("length", [4 * 1024 * 1024 + 1, 10 * 1024**3])
def test_a_body_over_max_body_bytes_is_413_before_it_is_read(client, snapshot, length):
    before = snapshot()
    request = webtest.TestRequest.blank("/txn", environ={"REQUEST_METHOD": "POST"})
    request.environ.update(
        {"CONTENT_TYPE": JSON_TYPE, "CONTENT_LENGTH": str(length), "wsgi.input": Unread()}
    )
    response = client.do_request(request, status=413, expect_errors=True)
    assert response.text == f"the request body is {length} bytes; the limit is 4194304\n"
    assert snapshot() == before


# -- the guard treats it as a write ---------------------------------------------------------------


@BEFORE_STORAGE
def test_the_guard_treats_it_as_a_write(make_client, snapshot):
    document = {"then": [OK_PUT]}
    protected = make_client(auth_token="s3cret-token-0123456789")
    before = snapshot()
    assert txn(protected, document, status=401).headers["WWW-Authenticate"].startswith("Bearer")
    for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Origin": "http://evil.example"}):
        assert txn(make_client(), document, status=403, headers=headers)
    txn(make_client(), document, status=400, headers={"Host": "evil.example"})
    assert snapshot() == before
    auth = {"Authorization": "Bearer s3cret-token-0123456789"}
    txn(protected, document, headers=auth)
    assert stored_value(protected, "k")[0] == b"v"


# -- storage errors ----------------------------------------------------------------------------


@BEFORE_STORAGE
def test_a_full_database_is_507_and_stores_nothing(client, snapshot):
    client.app.repository.set_many([("a", b"old", TEXT)])
    before = snapshot()
    writer = client.app.repository._writer
    writer.execute("PRAGMA max_page_count = 1")  # caps the file at its current size
    document = {"then": [{"put": "a", "value": "new"}, {"put": "big", "value": "x" * 200_000}]}
    response = txn(client, document, status=507)
    assert "full" in response.text
    assert snapshot() == before
    writer.execute("PRAGMA max_page_count = 1073741823")
    txn(client, document)
    assert stored_value(client, "a")[0] == b"new"


@BEFORE_STORAGE
def test_a_locked_database_is_503_with_retry_after(make_client, db_path, snapshot):
    client = make_client(busy_timeout_ms=50)
    client.app.repository.set_many([("a", b"old", TEXT)])
    before = snapshot()
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        response = txn(client, {"then": [{"put": "a", "value": "new"}]}, status=503)
        assert int(response.headers["Retry-After"]) >= 1
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert snapshot() == before


# -- against a dict model --------------------------------------------------------------------------

KEYS = ["a", "b", "é", "dir/x"]


class Model:
    """The store as a dict: key -> (value, content_type, revision)."""

    def __init__(self, revision: int) -> None:
        self.data: dict[str, tuple[bytes, str, int]] = {}
        self.revision = revision

    def apply(self, document: dict) -> dict:
        succeeded = all(self._holds(condition) for condition in document.get("if", []))
        branch = document.get("then" if succeeded else "else", [])
        before = dict(self.data)
        results = []
        wrote = False
        for operation in branch:
            if "put" in operation:
                wrote = True
        revision = self.revision + 1 if wrote or self._deletes_something(branch) else self.revision
        for operation in branch:
            if "get" in operation:
                found = before.get(operation["get"])
                results.append(_model_get(operation["get"], found))
            elif "put" in operation:
                key = operation["put"]
                if "value" in operation:
                    value, content_type = operation["value"].encode(), TEXT
                else:
                    value = base64.b64decode(operation["value_base64"])
                    content_type = "application/octet-stream"
                content_type = operation.get("content_type", content_type)
                results.append({"put": key, "etag": f'"{revision}"', "created": key not in before})
                self.data[key] = (value, content_type, revision)
            else:
                key = operation["delete"]
                results.append({"delete": key, "deleted": key in before})
                self.data.pop(key, None)
        self.revision = revision
        return {"succeeded": succeeded, "revision": revision, "results": results}

    def _holds(self, condition: dict) -> bool:
        found = self.data.get(condition["key"])
        if "exists" in condition:
            return (found is not None) is condition["exists"]
        return found is not None and condition["etag"] == f'"{found[2]}"'

    def _deletes_something(self, branch: list) -> bool:
        return any(
            "delete" in operation and operation["delete"] in self.data for operation in branch
        )


def _model_get(key: str, found: tuple[bytes, str, int] | None) -> dict:
    if found is None:
        return {"get": key, "found": False}
    value, content_type, revision = found
    try:
        shown = {"value": value.decode("utf-8")}
    except UnicodeDecodeError:
        shown = {"value_base64": base64.b64encode(value).decode()}
    return {
        "get": key,
        "found": True,
        **shown,
        "content_type": content_type,
        "etag": f'"{revision}"',
    }


@st.composite
def operations(draw):
    chosen = []
    written = set()
    for _ in range(draw(st.integers(0, 5))):
        key = draw(st.sampled_from(KEYS))
        verb = draw(st.sampled_from(["put", "delete", "get"]))
        if (key, verb == "get") in written:
            continue
        written.add((key, verb == "get"))
        if verb == "put":
            if draw(st.booleans()):
                value = draw(st.text(max_size=5).filter(_encodable))
                operation = {"put": key, "value": value}
            else:
                value = base64.b64encode(draw(st.binary(max_size=5))).decode()
                operation = {"put": key, "value_base64": value}
            if draw(st.booleans()):
                operation["content_type"] = draw(st.sampled_from(["a/b", "text/x; q=1"]))
            chosen.append(operation)
        else:
            chosen.append({verb: key})
    return chosen


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@st.composite
def transactions(draw):
    """A transaction on KEYS; an etag condition holds an offset from the store's revision."""
    conditions = []
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(KEYS))
        if draw(st.booleans()):
            conditions.append({"key": key, "exists": draw(st.booleans())})
        else:
            conditions.append({"key": key, "etag": draw(st.integers(-4, 1))})
    document = {"if": conditions, "then": draw(operations())}
    if draw(st.booleans()):
        document["else"] = draw(operations())
    return document


def placed(document: dict, prefix: str, revision: int) -> dict:
    """Return document with its keys under prefix and its etag offsets made ETags."""
    out = {"if": []}
    for condition in document["if"]:
        condition = {**condition, "key": prefix + condition["key"]}
        if "etag" in condition:
            condition["etag"] = f'"{max(1, revision + condition["etag"])}"'
        out["if"].append(condition)
    for branch in ("then", "else"):
        if branch in document:
            out[branch] = [
                {name: prefix + value if name in VERBS else value for name, value in op.items()}
                for op in document[branch]
            ]
    return out


VERBS = ("put", "delete", "get")
_examples = iter(range(10**9))


@hypothesis_settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_transactions_match_a_dict_model(client, data):
    prefix = f"{next(_examples)}/"  # each example starts from absent keys
    start = txn(client, {}).json["revision"]
    model = Model(start)
    for _ in range(data.draw(st.integers(1, 6))):
        document = placed(data.draw(transactions()), prefix, model.revision)
        assert txn(client, document).json == model.apply(document)
    for key in KEYS:
        found = model.data.get(prefix + key)
        assert stored_value(client, prefix + key) == found


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["if", "then", "else", "key", "etag", "exists", *VERBS, "value", "ttl"])
            | st.text(max_size=4),
            children,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@BEFORE_STORAGE
@hypothesis_settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(document=JSON_VALUES)
def test_any_json_document_is_answered_200_or_400_never_500(client, snapshot, document):
    before = snapshot()
    body = json.dumps(document).encode("utf-8", "surrogatepass")
    response = txn(client, body, status="*")
    assert response.status_int in (200, 400), response.text
    if response.status_int == 400:
        assert response.text.count("\n") == 1
        assert snapshot() == before
