"""The /kv/ resource API in process (WebTest): every row of the contract and its errors."""

from __future__ import annotations

import io
import json
from urllib.parse import quote, urljoin

import hypothesis.strategies as st
import pytest
import webtest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings

from kvapp.store import open_store
from kvapp.store.base import InvalidInput, check_content_type
from kvapp.web.app import App

JSON_ACCEPT = {"Accept": "application/json"}

pytestmark = pytest.mark.backends("sqlite", "postgres")
# Requests refused before the repository is reached answer the same whatever
# stores the data: their long tables run on SQLite alone.
BEFORE_STORAGE = pytest.mark.backends("sqlite")


@pytest.fixture
def timed(settings, clock):
    """A TestApp whose repository reads the time from clock."""
    app = App(settings, open_store(settings, clock=clock))
    yield webtest.TestApp(app)
    app.close()


def put(client, key, body=b"", status="*", content_type=None, headers=None, query=""):
    headers = dict(headers or {})
    if content_type is not None:
        headers["Content-Type"] = content_type
    return client.request(
        f"/kv/{key}{query}", method="PUT", body=body, headers=headers, status=status
    )


def test_put_new_key_is_201_with_etag_and_location(client):
    response = put(client, "greeting", b"hello", content_type="text/plain")
    assert response.status_int == 201
    assert response.headers["ETag"].startswith('"')
    assert response.headers["Location"] == "/kv/greeting"
    assert response.body == b""


SEGMENTS = st.lists(st.sampled_from([".", "..", "a", "é", "%", " ", "...", ""]), min_size=1)


# The client fixture's store lives across examples: each example deletes its key.
@hypothesis_settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(segments=SEGMENTS)
def test_a_location_names_the_key_it_stored_after_a_client_resolves_it(client, segments):
    key = "/".join(segments)
    if not key:
        return
    response = put(client, quote(key, safe=""), key.encode(), status=201)
    # What a client does with it: resolve it against the request's URL
    # (RFC 3986 section 5.2), which removes literal "." and ".." segments.
    resolved = urljoin("http://localhost/kv/some/thing", response.headers["Location"])
    assert client.get(resolved[len("http://localhost") :]).body == key.encode()
    client.delete(f"/kv/{quote(key, safe='')}")


def test_put_replacing_is_204_with_a_new_etag(client):
    first = put(client, "k", b"1").headers["ETag"]
    response = put(client, "k", b"2")
    assert response.status_int == 204
    assert "Content-Length" not in response.headers
    assert "Content-Type" not in response.headers
    assert response.headers["ETag"] != first
    assert client.get("/kv/k").body == b"2"


def test_put_stores_body_bytes_exactly_and_content_type(client):
    value = bytes(range(256)) * 3 + b"\r\n\x00"
    put(client, "bin", value, content_type="image/png")
    response = client.get("/kv/bin")
    assert response.body == value
    assert response.headers["Content-Type"] == "image/png"
    assert response.headers["Content-Length"] == str(len(value))


def test_put_without_content_type_stores_octet_stream(client):
    client.app.repository.set_many([("x", b"", "text/plain")])
    put(client, "raw", b"\xff\xfe")
    assert client.get("/kv/raw").headers["Content-Type"] == "application/octet-stream"


def test_put_empty_body_stores_empty_value(client):
    assert put(client, "empty").status_int == 201
    response = client.get("/kv/empty")
    assert (response.body, response.headers["Content-Length"]) == (b"", "0")


def test_get_headers(client):
    etag = put(client, "page", b"<script>alert(1)</script>", content_type="text/html").headers[
        "ETag"
    ]
    response = client.get("/kv/page")
    assert response.status_int == 200
    assert response.headers["Content-Type"] == "text/html"
    assert response.headers["ETag"] == etag
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "sandbox" in response.headers["Content-Security-Policy"]


def test_head_has_get_headers_and_no_body(client):
    put(client, "h", b"12345", content_type="text/csv")
    get = client.get("/kv/h")
    head = client.head("/kv/h")
    assert head.status_int == 200
    assert head.body == b""
    for name in ("Content-Type", "Content-Length", "ETag", "Cache-Control"):
        assert head.headers[name] == get.headers[name]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_get_absent_key_is_404(client, method):
    response = client.request("/kv/nothing", method=method, status=404)
    if method == "GET":
        assert response.text == "no such key: 'nothing'\n"


def test_if_none_match_current_etag_is_304_with_etag(client):
    etag = put(client, "c", b"v").headers["ETag"]
    response = client.get("/kv/c", headers={"If-None-Match": etag}, status=304)
    assert response.body == b""
    assert response.headers["ETag"] == etag
    assert "Content-Length" not in response.headers
    # weak comparison for If-None-Match (RFC 9110 section 13.1.2), lists and *
    client.get("/kv/c", headers={"If-None-Match": f"W/{etag}"}, status=304)
    client.get("/kv/c", headers={"If-None-Match": f'"999999", {etag}'}, status=304)
    client.get("/kv/c", headers={"If-None-Match": "*"}, status=304)
    client.head("/kv/c", headers={"If-None-Match": etag}, status=304)


def test_if_none_match_old_etag_gets_the_value(client):
    old = put(client, "c", b"v1").headers["ETag"]
    put(client, "c", b"v2")
    response = client.get("/kv/c", headers={"If-None-Match": old})
    assert (response.status_int, response.body) == (200, b"v2")


def test_get_if_match_other_version_is_412(client):
    etag = put(client, "c", b"v").headers["ETag"]
    client.get("/kv/c", headers={"If-Match": etag}, status=200)
    client.get("/kv/c", headers={"If-Match": '"123456"'}, status=412)


def test_delete_is_204_then_404(client):
    put(client, "d", b"v")
    response = client.delete("/kv/d", status=204)
    assert response.body == b""
    client.get("/kv/d", status=404)
    client.delete("/kv/d", status=404)


# -- compare-and-set ---------------------------------------------------------


def test_put_if_match_current_etag_applies(client):
    etag = put(client, "cas", b"1").headers["ETag"]
    response = put(client, "cas", b"2", headers={"If-Match": etag})
    assert response.status_int == 204
    assert client.get("/kv/cas").body == b"2"


def test_put_if_match_stale_etag_is_412_and_changes_nothing(client):
    stale = put(client, "cas", b"1").headers["ETag"]
    current = put(client, "cas", b"2").headers["ETag"]
    response = put(client, "cas", b"3", headers={"If-Match": stale}, status=412)
    assert "nothing was changed" in response.text
    after = client.get("/kv/cas")
    assert (after.body, after.headers["ETag"]) == (b"2", current)


def test_put_if_match_weak_tag_never_matches(client):
    etag = put(client, "cas", b"1").headers["ETag"]
    put(client, "cas", b"2", headers={"If-Match": f"W/{etag}"}, status=412)


def test_put_if_match_on_absent_key_is_412(client):
    put(client, "nokey", b"1", headers={"If-Match": '"1"'}, status=412)
    client.get("/kv/nokey", status=404)


def test_delete_if_match(client):
    stale = put(client, "d", b"1").headers["ETag"]
    current = put(client, "d", b"2").headers["ETag"]
    client.delete("/kv/d", headers={"If-Match": stale}, status=412)
    assert client.get("/kv/d").body == b"2"
    client.delete("/kv/d", headers={"If-Match": current}, status=204)
    client.get("/kv/d", status=404)


def test_delete_absent_key_with_condition_is_404(client):
    # RFC 9110 section 13.2.1: preconditions are ignored when the answer is not 2xx anyway.
    client.delete("/kv/gone", headers={"If-Match": '"1"'}, status=404)


def test_if_match_star_is_update_only(client):
    put(client, "u", b"1", headers={"If-Match": "*"}, status=412)
    client.get("/kv/u", status=404)
    put(client, "u", b"1")
    assert put(client, "u", b"2", headers={"If-Match": "*"}).status_int == 204
    assert client.get("/kv/u").body == b"2"


def test_if_none_match_star_is_create_only(client):
    assert put(client, "c", b"1", headers={"If-None-Match": "*"}).status_int == 201
    put(client, "c", b"2", headers={"If-None-Match": "*"}, status=412)
    assert client.get("/kv/c").body == b"1"


@pytest.mark.parametrize("value", ["", " ", ",", '"*"', '"05"', '"x"', 'W/"999", ,'])
def test_a_foreign_if_match_matches_nothing(client, value):
    put(client, "m", b"1")
    put(client, "m", b"2", headers={"If-Match": value}, status=412)
    client.delete("/kv/m", headers={"If-Match": value}, status=412)
    client.get("/kv/m", headers={"If-Match": value}, status=412)
    assert client.get("/kv/m").body == b"1"
    # If-None-Match that matches nothing lets the request through
    assert client.get("/kv/m", headers={"If-None-Match": value}).body == b"1"
    assert put(client, "m", b"3", headers={"If-None-Match": value}).status_int == 204


@pytest.mark.parametrize(
    "value", ["5", "W/5", '"a b"', "**", '*, "1"', '"1" "2"', 'junk "1"', '"1", junk', 'W/ "1"']
)
@pytest.mark.parametrize("header", ["If-Match", "If-None-Match"])
def test_a_condition_that_is_not_a_list_of_entity_tags_is_400_and_stores_nothing(
    client, header, value
):
    # Which tag the client meant is a guess: If-None-Match: *, read as
    # matching nothing, would turn a create-only PUT into an overwrite.
    put(client, "m", b"1")
    message = f"{header} must be * or a list of entity tags"
    assert message in put(client, "m", b"2", headers={header: value}, status=400).text
    assert message in client.delete("/kv/m", headers={header: value}, status=400).text
    assert message in client.get("/kv/m", headers={header: value}, status=400).text
    assert client.get("/kv/m").body == b"1"


@pytest.mark.parametrize(
    ("wire", "quoted"),
    [
        (b"\xc3\xa9t\xc3\xa9", "'\u00e9t\u00e9'"),
        (b"\xe2\x98\x83", "'\u2603'"),
        (b"\xe9", "'\ufffd'"),
    ],
)
def test_a_refused_header_is_quoted_as_its_utf8_was_sent(client, wire, quoted):
    # WSGI hands header bytes over as latin-1 characters (PEP 3333): quoted
    # as such, "\u00e9t\u00e9" would come back as the mojibake "\u00c3\u00a9t\u00c3\u00a9".
    header = wire.decode("latin-1")
    put(client, "m", b"1")
    text = put(client, "m", b"2", headers={"If-Match": header}, status=400).text
    assert text == f'If-Match must be * or a list of entity tags such as "42", not {quoted}\n'
    text = client.get("/kv/?watch", headers={"Last-Event-ID": header}, status=400).text
    assert text.endswith(f" not {quoted}\n")
    assert client.get("/kv/m").body == b"1"


def test_if_match_list_with_the_current_tag_applies(client):
    etag = put(client, "m", b"1").headers["ETag"]
    headers = {"If-Match": f'"999", W/{etag}, "junk", {etag}'}
    assert put(client, "m", b"2", headers=headers).status_int == 204


def test_etag_changes_on_every_write_and_survives_restart(settings):
    app = App(settings, open_store(settings))
    client = webtest.TestApp(app)
    tags = [put(client, "k", str(i).encode()).headers["ETag"] for i in range(5)]
    tags.append(client.app.repository and client.get("/kv/k").headers["ETag"])
    app.close()
    assert len(set(tags[:5])) == 5 and tags[5] == tags[4]
    app = App(settings, open_store(settings))
    client = webtest.TestApp(app)
    try:
        assert client.get("/kv/k").headers["ETag"] == tags[4]
        client.get("/kv/k", headers={"If-None-Match": tags[4]}, status=304)
        put(client, "k", b"4", headers={"If-Match": tags[4]}, status=204)
        assert client.get("/kv/k").headers["ETag"] not in tags
    finally:
        app.close()


# -- TTL ------------------------------------------------------------------------


def test_ttl_expires_the_key(timed, clock):
    assert put(timed, "t", b"v", query="?ttl=10").status_int == 201
    clock.now += 9.999
    assert timed.get("/kv/t").body == b"v"
    clock.now += 0.001
    timed.get("/kv/t", status=404)
    timed.head("/kv/t", status=404)
    timed.get("/get?key=t", status=404)
    assert timed.get("/kv/").body == b""


def test_expired_key_counts_as_absent_for_writes(timed, clock):
    put(timed, "t", b"v", query="?ttl=1")
    clock.now += 2
    put(timed, "t", b"w", headers={"If-Match": "*"}, status=412)
    timed.delete("/kv/t", status=404)
    put(timed, "u", b"v", query="?ttl=1")
    clock.now += 2
    assert put(timed, "u", b"w", headers={"If-None-Match": "*"}).status_int == 201


def test_write_without_ttl_clears_it(timed, clock):
    put(timed, "t", b"v", query="?ttl=5")
    put(timed, "t", b"w")
    clock.now += 10
    assert timed.get("/kv/t").body == b"w"


def test_set_clears_ttl(timed, clock):
    put(timed, "t", b"v", query="?ttl=5")
    timed.get("/set?t=w")
    clock.now += 10
    assert timed.get("/kv/t").body == b"w"


def test_new_ttl_replaces_old_one(timed, clock):
    put(timed, "t", b"v", query="?ttl=100")
    put(timed, "t", b"v", query="?ttl=1")
    clock.now += 1
    timed.get("/kv/t", status=404)


@BEFORE_STORAGE
@pytest.mark.parametrize(
    "query",
    ["?ttl=0", "?ttl=-1", "?ttl=1.5", "?ttl=", "?ttl=abc", "?ttl=+5", "?ttl=%201", "?ttl=1e3",
     "?ttl=2147483648", "?ttl=99999999999999999999999", "?ttl=1&ttl=2", "?other=1", "?ttl"],
)  # fmt: skip
def test_bad_ttl_is_400_and_stores_nothing(client, query):
    put(client, "t", b"v", query=query, status=400)
    client.get("/kv/t", status=404)


# -- keys in the path ------------------------------------------------------------


def test_key_may_contain_slashes_and_utf8(client):
    put(client, "a/b/c", b"1")
    put(client, "caf%C3%A9%20%E2%98%83", b"2")
    put(client, "plus+sign", b"3")
    assert client.get("/kv/a/b/c").body == b"1"
    assert client.get("/kv/a%2Fb%2Fc").body == b"1"
    assert client.get("/get?key=caf%C3%A9+%E2%98%83").body == b"2"
    # '+' in a path is a plus, not a space
    assert client.get("/get?key=plus%2Bsign").body == b"3"


@BEFORE_STORAGE
@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/kv/%ff", "not valid UTF-8"),
        ("/kv/%c3%28", "not valid UTF-8"),
        ("/kv/a%00b", "control character"),
        ("/kv/a%0Ab", "control character"),
        ("/kv/a%7Fb", "control character"),
        ("/kv/" + "k" * 1025, "limit is 1024 bytes"),
        ("/kv/" + "%C3%A9" * 513, "limit is 1024 bytes"),
    ],
)
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_bad_key_is_400(client, method, path, why):
    response = client.request(path, method=method, status=400)
    assert why in response.text


def test_key_of_exactly_max_bytes_is_fine(client):
    put(client, "%C3%A9" * 512, b"v", status=201)


@BEFORE_STORAGE
@pytest.mark.parametrize("raw", ["/kv/%zz", "/kv/a%4", "/kv/a%", "/kv/%g0"])
def test_malformed_escape_in_raw_uri_is_400(client, raw):
    # waitress decodes PATH_INFO leniently (it keeps '%zz'); REQUEST_URI is decoded strictly.
    response = client.get(
        "/kv/lenient", extra_environ={"REQUEST_URI": raw, "PATH_INFO": raw}, status=400
    )
    assert "malformed percent-escape" in response.text


@pytest.mark.parametrize(
    ("raw", "path", "query", "why"),
    [
        # What waitress's urlsplit leaves of each: the fragment and tabs dropped.
        ("/kv/frag#ment", "/kv/frag", "", "raw '#'"),
        ("/set?fr1=1#fr2=2", "/set", "fr1=1", "raw '#'"),
        ("/kv/ta\tb", "/kv/tab", "", "byte 0x09"),
        ("/set?t\te=1", "/set", "te=1", "byte 0x09"),
        ("/set?a=1\x01", "/set", "a=1\x01", "byte 0x01"),
        ("/set?a=1 2", "/set", "a=1 2", "byte 0x20"),
        ("/set?a=\x7f", "/set", "a=\x7f", "byte 0x7f"),
    ],
)
@pytest.mark.parametrize("method", ["GET", "PUT"])
def test_a_raw_fragment_space_or_control_byte_in_the_target_is_400(
    client, method, raw, path, query, why
):
    environ = {"REQUEST_URI": raw, "PATH_INFO": path, "QUERY_STRING": query}
    response = client.request(path, method=method, environ=environ, body=b"v", status=400)
    assert why in response.text and response.text.count("\n") == 1
    assert client.get("/kv/").text == ""  # nothing was stored


def test_raw_uri_is_used_for_the_key(client):
    put(client, "a%2Bb", b"v")  # stored as "a+b"
    environ = {"REQUEST_URI": "/kv/a%2Bb?", "PATH_INFO": "/kv/a+b"}
    assert client.get("/kv/a+b", extra_environ=environ).body == b"v"
    absolute = {"REQUEST_URI": "http://localhost:4000/kv/a%2Bb", "PATH_INFO": "/kv/a+b"}
    assert client.get("/kv/a+b", extra_environ=absolute).body == b"v"


def test_query_parameters_on_a_key_are_400(client):
    put(client, "k", b"v")
    client.get("/kv/k?x=1", status=400)
    client.delete("/kv/k?x=1", status=400)
    assert client.get("/kv/k").body == b"v"


# -- sizes and types -------------------------------------------------------------


def test_value_over_max_value_bytes_is_413_before_reading(make_settings):
    settings = make_settings(max_value_bytes=10)
    app = App(settings, open_store(settings))
    client = webtest.TestApp(app)
    try:
        put(client, "k", b"x" * 10, status=201)
        response = put(client, "k", b"y" * 11, status=413)
        assert "limit is 10" in response.text
        assert client.get("/kv/k").body == b"x" * 10

        class Unreadable(io.BytesIO):
            def read(self, *args):
                raise AssertionError("the body was read")

            readline = readlines = read

        environ = {"wsgi.input": Unreadable(), "CONTENT_LENGTH": "1000000"}
        client.request("/kv/k", method="PUT", environ=environ, status=413)
    finally:
        app.close()


@BEFORE_STORAGE
@pytest.mark.parametrize(
    "content_type",
    ["text", "text/", "/plain", "te xt/plain", "a/b\x7f", "a/" + "b" * 300]
    # WSGI gives header bytes as latin-1: NEL and NBSP are not the spaces OWS allows.
    + ["a/b\x85;x", "a/b\xa0;x", "a/b\x1c;x", "a/b\x0b;x"]
    # Not one media type: a list (a browser takes the last: text/html), a
    # parameter without a value, a value with a space, an open quote.
    + ["text/plain; a=b, text/html", "text/plain, text/html", "a/b; x", "a/b; x=", "a/b; x=y z"]
    + ['a/b; x="open', "a/b; =y"],
)
def test_bad_content_type_is_400(client, content_type):
    client.request(
        "/kv/k", method="PUT", body=b"v", environ={"CONTENT_TYPE": content_type}, status=400
    )
    client.get("/kv/k", status=404)


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json; charset=utf-8",
        'multipart/mixed; boundary="a b;c,d"',  # a quoted-string may hold ; and ,
        'a/b;x="q\\"y";c=d',
        "text/plain;",  # an empty parameter (RFC 9110 section 5.6.6)
    ],
)
def test_content_type_parameters_are_kept(client, content_type):
    put(client, "k", b"{}", content_type=content_type)
    assert client.get("/kv/k").headers["Content-Type"] == content_type


# Inputs that made a backtracking regex try every split of their whitespace:
# each took seconds to hours before the patterns were made unambiguous.  The
# timeout marks a hang, not a speed: a sound match takes microseconds.
PATHOLOGICAL_CONTENT_TYPES = [
    "text/plain" + "; " * 122 + "@",
    "text/plain" + " ;" * 122 + "@",
    "a/b;" + " \t" * 125 + "@",
    "a/b" + "; x=y" * 50 + " @",
]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("content_type", PATHOLOGICAL_CONTENT_TYPES)
def test_a_content_type_that_backtracks_is_refused_at_once(client, content_type):
    put(client, "k", b"v", content_type=content_type, status=400)
    txn = {"then": [{"put": "k", "value": "v", "content_type": content_type}]}
    client.post_json("/txn", txn, status=400)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("header", ["If-Match", "If-None-Match"])
def test_a_condition_that_backtracks_is_refused_at_once(client, header):
    value = "," + " " * 60_000 + "x"
    put(client, "k", b"v", headers={header: value}, status=400)


def top_level_commas(text: str) -> int:
    """Count the commas outside quoted strings: a Content-Type list's separators."""
    commas, quoted, escaped = 0, False, False
    for char in text:
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            commas += 1
    return commas


@given(st.text(alphabet=st.sampled_from('ab/;=", \t\\x'), max_size=30))
def test_a_stored_content_type_is_one_media_type(content_type):
    try:
        check_content_type(content_type)
    except InvalidInput:
        return
    assert top_level_commas(content_type) == 0
    assert content_type.split(";")[0].count("/") == 1


# -- one keyspace with /set and /get ---------------------------------------------


def test_set_is_read_through_kv_and_put_through_get(client):
    client.get("/set?from_set=1")
    response = client.get("/kv/from_set")
    assert (response.body, response.headers["Content-Type"]) == (
        b"1",
        "text/plain; charset=utf-8",
    )
    put(client, "from_put", b"\x89PNG", content_type="image/png")
    response = client.get("/get?key=from_put")
    assert (response.body, response.headers["Content-Type"]) == (b"\x89PNG", "image/png")


def test_get_has_etag_and_honours_if_none_match(client):
    etag = put(client, "k", b"v").headers["ETag"]
    response = client.get("/get?key=k")
    assert response.headers["ETag"] == etag
    assert response.headers["Cache-Control"] == "no-store"
    not_modified = client.get("/get?key=k", headers={"If-None-Match": etag}, status=304)
    assert not_modified.body == b""
    assert not_modified.headers["ETag"] == etag
    client.head("/get?key=k", headers={"If-None-Match": etag}, status=304)
    assert client.get("/get?key=k", headers={"If-None-Match": '"0"'}).body == b"v"


def test_set_write_changes_the_etag(client):
    etag = put(client, "k", b"v").headers["ETag"]
    client.get("/set?k=w")
    assert client.get("/kv/k").headers["ETag"] != etag
    put(client, "k", b"x", headers={"If-Match": etag}, status=412)


# -- /delete ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_delete_route(client, method):
    client.get("/set?k=v")
    response = client.request("/delete?key=k", method=method)
    assert (response.status_int, response.text) == (200, "deleted 1 key\n")
    client.get("/kv/k", status=404)
    response = client.request("/delete?key=k", method=method, status=404)
    assert response.text == "no such key: 'k'\n"


def test_delete_route_post_form_body(client):
    client.get("/set?k=v")
    client.post("/delete", {"key": "k"}, status=200)
    client.get("/get?key=k", status=404)


@BEFORE_STORAGE
@pytest.mark.parametrize(
    "query", ["", "?key=", "?key=a&key=b", "?key=a&x=1", "?name=a", "?key=%ff", "?key=%zz"]
)
def test_delete_route_bad_query_is_400(client, query):
    client.get("/set?a=1")
    client.get(f"/delete{query}", status=400)
    assert client.get("/get?key=a").body == b"1"


# -- listing ----------------------------------------------------------------------


def keys_of(response) -> list[str]:
    """Return the listed keys: each line ends in LF, and only LF ends one (not U+2028)."""
    assert response.text == "" or response.text.endswith("\n")
    return response.text.split("\n")[:-1]


def test_a_key_with_a_unicode_line_separator_is_one_line_of_the_listing(client):
    client.get("/set?p/%E2%80%A8=7&p/%E2%80%A9x=8&p/y=9")
    assert keys_of(client.get("/kv/?prefix=p/")) == ["p/y", "p/\u2028", "p/\u2029x"]


@pytest.fixture
def listed(client):
    """A store holding keys whose UTF-8 byte order differs from naive orders."""
    keys = ["b", "a", "a/1", "a/2", "ab", "B", "é", "z", "☃", "\U0001f600", "a\U0010ffff", "aa"]
    for key in keys:
        client.app.repository.set_many([(key, b"v", "text/plain")])
    return sorted(keys, key=lambda k: k.encode("utf-8"))


def test_list_all_in_utf8_byte_order(client, listed):
    response = client.get("/kv/")
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert keys_of(response) == listed
    assert response.text.endswith("\n")
    assert "Link" not in response.headers


def test_a_listing_names_the_revision_it_was_read_at(client, listed):
    # listed made 12 writes: the store is at revision 12.
    assert client.get("/kv/").headers["X-Kvapp-Revision"] == "12"
    assert client.get("/kv/?prefix=nope").headers["X-Kvapp-Revision"] == "12"
    client.put("/kv/new", b"v")
    page = client.get("/kv/?limit=2", headers={"Accept": "application/json"})
    assert page.headers["X-Kvapp-Revision"] == "13"
    assert page.headers["Link"]  # paged answers carry it too
    assert client.head("/kv/").headers["X-Kvapp-Revision"] == "13"


def test_list_prefix(client, listed):
    assert keys_of(client.get("/kv/?prefix=a")) == ["a", "a/1", "a/2", "aa", "ab", "a\U0010ffff"]
    assert keys_of(client.get("/kv/?prefix=a/")) == ["a/1", "a/2"]
    assert keys_of(client.get("/kv/?prefix=%E2%98%83")) == ["☃"]
    assert keys_of(client.get("/kv/?prefix=nope")) == []
    assert client.get("/kv/?prefix=nope").body == b""


def test_list_prefix_at_the_top_code_point(client):
    for key in ["\U0010ffff", "\U0010ffffa", "\U0010fffe"]:
        client.app.repository.set_many([(key, b"v", "text/plain")])
    assert keys_of(client.get("/kv/?prefix=%F4%8F%BF%BF")) == ["\U0010ffff", "\U0010ffffa"]


def test_list_after_and_limit_page_through(client, listed):
    seen, after, pages = [], None, 0
    while pages < 20:
        query = "limit=5" + (f"&after={quote(after)}" if after else "")
        response = client.get(f"/kv/?{query}", headers=JSON_ACCEPT)
        assert response.headers["Content-Type"] == "application/json"
        page = response.json
        seen += page["keys"]
        pages += 1
        if page["next"] is None:
            assert "Link" not in response.headers
            break
        assert page["keys"][-1] == page["next"]
        assert response.headers["Link"].endswith('>; rel="next"')
        after = page["next"]
    assert seen == listed
    assert pages == 3


def test_link_header_leads_to_the_next_page(client, listed):
    response = client.get("/kv/?prefix=a&limit=2")
    assert keys_of(response) == ["a", "a/1"]
    link = response.headers["Link"]
    assert link == '</kv/?prefix=a&limit=2&after=a%2F1>; rel="next"'
    response = client.get(link[1 : link.index(">")])
    assert keys_of(response) == ["a/2", "aa"]


def test_list_json_shape(client, listed):
    body = json.loads(client.get("/kv/?prefix=a/", headers=JSON_ACCEPT).body)
    assert body == {"keys": ["a/1", "a/2"], "next": None}


def test_list_hides_expired_keys(timed, clock):
    put(timed, "a", b"v", query="?ttl=1")
    put(timed, "b", b"v")
    clock.now += 1
    assert keys_of(timed.get("/kv/")) == ["b"]


def test_list_head(client, listed):
    response = client.head("/kv/?limit=1")
    assert response.body == b""
    assert "Link" in response.headers


def test_list_default_limit_is_1000(client):
    client.app.repository.set_many([(f"k{i:04d}", b"", "text/plain") for i in range(1001)])
    response = client.get("/kv/")
    assert len(keys_of(response)) == 1000
    assert "after=k0999" in response.headers["Link"]
    assert len(keys_of(client.get("/kv/?limit=10000"))) == 1001


@BEFORE_STORAGE
@pytest.mark.parametrize(
    "query",
    ["limit=0", "limit=10001", "limit=-1", "limit=abc", "limit=", "limit=1.5", "limit=1&limit=2",
     "prefix=a&prefix=b", "prefix=%ff", "prefix=%zz", "prefix=a%00", "after=%0A", "bogus=1",
     "prefix=" + "p" * 1025],
)  # fmt: skip
def test_list_bad_query_is_400(client, query):
    client.get(f"/kv/?{query}", status=400)


@BEFORE_STORAGE
@pytest.mark.parametrize(
    ("query", "start"),
    [
        ("prefix=a%00", "prefix: "),
        ("prefix=" + "p" * 1025, "prefix: "),
        ("after=%0A", "after: "),
        ("watch&prefix=a%01", "prefix: "),
    ],
)
def test_a_bad_prefix_or_after_is_named_in_its_400(client, query, start):
    assert client.get(f"/kv/?{query}", status=400).text.startswith(start)


# -- 405 with Allow on every new route -----------------------------------------------


@BEFORE_STORAGE
@pytest.mark.parametrize(
    ("path", "method", "allow"),
    [
        ("/kv/k", "POST", "GET, HEAD, PUT, DELETE"),
        ("/kv/k", "PATCH", "GET, HEAD, PUT, DELETE"),
        ("/kv/a/b", "OPTIONS", "GET, HEAD, PUT, DELETE"),
        ("/kv/", "PUT", "GET, HEAD"),
        ("/kv/", "DELETE", "GET, HEAD"),
        ("/kv/", "POST", "GET, HEAD"),
        ("/delete", "PUT", "GET, POST"),
        ("/delete", "DELETE", "GET, POST"),
        ("/healthz", "POST", "GET, HEAD"),
        ("/metrics", "POST", "GET, HEAD"),
        ("/openapi.json", "PUT", "GET, HEAD"),
    ],
)
def test_other_methods_are_405_with_allow(client, path, method, allow):
    response = client.request(path, method=method, status=405)
    assert response.headers["Allow"] == allow


@BEFORE_STORAGE
@pytest.mark.parametrize("path", ["/kv", "/KV/a", "/kvx/a", "/healthz/", "/metrics/x"])
def test_near_miss_paths_are_404(client, path):
    client.get(path, status=404)
