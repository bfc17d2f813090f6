"""Issue 2's contract, in process through WebTest: every row and every error case.

Each request is built from its raw WSGI parts (method, PATH_INFO, QUERY_STRING
as PEP 3333 latin-1 text, body bytes), so nothing is re-encoded on the way in.
After every refused request the database file is compared with a snapshot
taken before it: nothing of a refused request may be stored.  Every test runs
on both backends, SQLite and PostgreSQL, but the storage faults made with
SQLite's own tools (PostgreSQL's are in test_postgres.py).
"""

from __future__ import annotations

import sqlite3
from io import BytesIO
from urllib.parse import quote, quote_plus

import pytest
import webtest
from helpers import stored
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from kvapp.web.request import Request
from kvapp.web.seed_routes import USAGE, Handlers

TEXT = "text/plain; charset=utf-8"
FORM = "application/x-www-form-urlencoded"
MIB = 1024 * 1024
MAX_KEY = 1024  # config.ini defaults, pinned by test_config
MAX_VALUE = MIB
MAX_BODY = 4 * MIB

pytestmark = pytest.mark.backends("sqlite", "postgres")
# Requests refused before the repository is reached answer the same whatever
# stores the data: their long tables run on SQLite alone.
BEFORE_STORAGE = pytest.mark.backends("sqlite")


def call(
    client: webtest.TestApp,
    method: str,
    path: str,
    query: str = "",
    body: bytes | None = None,
    content_type: str | None = None,
    status: int = 200,
    environ: dict | None = None,
) -> webtest.TestResponse:
    """Send one request built from raw WSGI parts; check the status and common headers."""
    req = webtest.TestRequest.blank(path, environ={"REQUEST_METHOD": method})
    req.environ["PATH_INFO"] = path
    req.environ["QUERY_STRING"] = query
    req.environ.pop("CONTENT_TYPE", None)
    if body is not None:
        req.body = body
    if content_type is not None:
        req.environ["CONTENT_TYPE"] = content_type
    if environ:
        req.environ.update(environ)
    res = client.do_request(req, status=status, expect_errors=status >= 400)
    check_common_headers(res, head=method == "HEAD")
    return res


def check_common_headers(res: webtest.TestResponse, head: bool = False) -> None:
    names = [name.lower() for name, _ in res.headerlist]
    for name in ("content-type", "content-length", "x-content-type-options", "cache-control"):
        assert names.count(name) == 1, (name, res.headerlist)
    assert res.headers["Content-Type"] == TEXT
    assert res.headers["X-Content-Type-Options"] == "nosniff"
    assert res.headers["Cache-Control"] == "no-store"
    if head:
        assert res.body == b""
    else:
        assert res.headers["Content-Length"] == str(len(res.body))


def check_message(res: webtest.TestResponse, *words: str) -> str:
    """Assert the body is one non-empty line of UTF-8 text holding words; return it."""
    assert res.body.endswith(b"\n") and res.body.count(b"\n") == 1, res.body
    message = res.body.decode("utf-8").rstrip("\n")
    assert message.strip() and "\r" not in message
    for word in words:
        assert word in message, (word, message)
    return message


def get_value(client: webtest.TestApp, key_query: str) -> bytes | None:
    """Return the value for an already %-encoded key, or None on 404."""
    req = webtest.TestRequest.blank("/get")
    req.environ["QUERY_STRING"] = f"key={key_query}"
    res = client.do_request(req, status="*", expect_errors=True)
    check_common_headers(res)
    if res.status_int == 404:
        return None
    assert res.status_int == 200, res
    return res.body


@pytest.fixture
def snapshot(database: str):
    """Return a function giving every row of the database, read independently."""

    def rows() -> tuple[list, list]:
        return (
            stored(
                database,
                "SELECT key, value, content_type, revision, expires_at FROM kv ORDER BY key",
            ),
            stored(database, "SELECT name, value FROM meta ORDER BY name"),
        )

    return rows


@pytest.fixture
def unlinted(app) -> webtest.TestApp:
    """A client without WebTest's lint, for requests lint refuses to send."""
    return webtest.TestApp(app, lint=False)


@pytest.fixture
def seeded(client, snapshot):
    """A client whose database holds a=old and b=old; returns (client, rows before)."""
    call(client, "GET", "/set", "a=old&b=old")
    return client, snapshot()


# -- GET /set and GET /get ------------------------------------------------------


def test_set_one_pair_then_get_it(client):
    res = call(client, "GET", "/set", "somekey=somevalue")
    assert res.body == b"stored 1 key\n"
    res = call(client, "GET", "/get", "key=somekey")
    assert res.body == b"somevalue"
    assert res.headers["Content-Length"] == "9"


def test_set_many_pairs_in_one_request(client, snapshot):
    res = call(client, "GET", "/set", "a=1&b=2&c=3")
    assert res.body == b"stored 3 keys\n"
    assert [get_value(client, k) for k in "abc"] == [b"1", b"2", b"3"]
    kv, _ = snapshot()
    assert len({row[3] for row in kv}) == 1  # one write: one revision for all three


def test_set_replaces_a_value(client):
    call(client, "GET", "/set", "k=first")
    call(client, "GET", "/set", "k=second&other=x")
    assert get_value(client, "k") == b"second"


def test_get_missing_key_is_404_with_one_line(client):
    res = call(client, "GET", "/get", "key=nope", status=404)
    check_message(res, "nope")


def test_stored_pairs_are_in_the_file(client, snapshot):
    call(client, "GET", "/set", "a=1")
    kv, _ = snapshot()
    assert [(key, value) for key, value, *_ in kv] == [("a", b"1")]


def test_empty_pair_segments_are_skipped(client):
    assert call(client, "GET", "/set", "&a=1&&b=2&").body == b"stored 2 keys\n"
    assert get_value(client, "a") == b"1" and get_value(client, "b") == b"2"


# -- decoding ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "key", "value"),
    [
        ("k=a+b", "k", b"a b"),
        ("k=a%2Bb", "k", b"a+b"),
        ("k=a%2bb", "k", b"a+b"),
        ("k=a%20b", "k", b"a b"),
        ("k=a%26b%3Dc", "k", b"a&b=c"),
        ("k=a=b", "k", b"a=b"),  # only the first '=' separates
        ("k=%C3%A9t%C3%A9", "k", "été".encode()),
        ("k=%c3%a9", "k", "é".encode()),
        ("k=%E2%82%AC", "k", "€".encode()),
        ("k=%F0%9F%98%80", "k", "😀".encode()),
        ("k=", "k", b""),
        ("k=line1%0Aline2%0D%0A", "k", b"line1\nline2\r\n"),
        ("k=%00%01%7F", "k", b"\x00\x01\x7f"),  # control characters are fine in values
        ("k=%25zz", "k", b"%zz"),
        ("k=~!*'();:@$,/?", "k", b"~!*'();:@$,/?"),
        ("a+b=1", "a b", b"1"),
        ("a%2Bb=1", "a+b", b"1"),
        ("a%26b=1", "a&b", b"1"),
        ("a%3Db=1", "a=b", b"1"),
        ("%C3%A9=1", "é", b"1"),
        ("K=upper", "K", b"upper"),
    ],
)
def test_decoding(client, query: str, key: str, value: bytes):
    call(client, "GET", "/set", query)
    assert get_value(client, quote(key, safe="")) == value


def test_raw_utf8_bytes_in_the_query_are_utf8(client):
    """Raw bytes reach WSGI as latin-1 text (PEP 3333); they are UTF-8 underneath."""
    raw = "é€".encode().decode("latin-1")
    call(client, "GET", "/set", f"{raw}={raw}")
    assert get_value(client, quote("é€")) == "é€".encode()
    res = call(client, "GET", "/get", f"key={raw}")
    assert res.body == "é€".encode()


def test_key_spellings_are_one_key(client):
    """'é' raw, %-encoded in upper and lower case: the same key."""
    call(client, "GET", "/set", "%C3%A9=1")
    call(client, "GET", "/set", "%c3%a9=2")
    assert get_value(client, "\xc3\xa9") == b"2"


def test_key_of_exactly_max_key_bytes_is_accepted(client):
    for key in ("k" * MAX_KEY, "é" * (MAX_KEY // 2), "😀" * (MAX_KEY // 4)):
        call(client, "GET", "/set", f"{quote(key)}=v")
        assert get_value(client, quote(key)) == b"v"


def test_value_of_exactly_max_value_bytes_is_accepted(client):
    value = bytes(range(32, 127)) * (MAX_VALUE // 95) + b"x" * (MAX_VALUE % 95)
    assert len(value) == MAX_VALUE
    call(client, "POST", "/set", body=b"big=" + quote(value).encode(), content_type=FORM)
    res = call(client, "GET", "/get", "key=big")
    assert res.body == value
    assert res.headers["Content-Length"] == str(MAX_VALUE)


def test_values_may_hold_any_character(client):
    value = "".join(chr(c) for c in range(1, 0x800)) + "\U0001f600\x00"
    call(client, "POST", "/set", body=f"k={quote(value)}".encode(), content_type=FORM)
    assert get_value(client, "k") == value.encode("utf-8")


# -- POST /set ----------------------------------------------------------------------


def test_post_form_body(client):
    res = call(client, "POST", "/set", body=b"a=1&b=x+y%26z", content_type=FORM)
    assert res.body == b"stored 2 keys\n"
    assert get_value(client, "a") == b"1" and get_value(client, "b") == b"x y&z"


def test_post_body_may_hold_raw_utf8_and_newlines(client):
    call(client, "POST", "/set", body="k=é\nline".encode(), content_type=FORM)
    assert get_value(client, "k") == "é\nline".encode()


def test_post_with_query_and_body_pairs_stores_both(client, snapshot):
    res = call(client, "POST", "/set", "q=1", body=b"b=2", content_type=FORM)
    assert res.body == b"stored 2 keys\n"
    assert get_value(client, "q") == b"1" and get_value(client, "b") == b"2"
    kv, _ = snapshot()
    assert len({row[3] for row in kv}) == 1


def test_post_with_pairs_only_in_the_query(client):
    assert call(client, "POST", "/set", "a=1").body == b"stored 1 key\n"
    assert get_value(client, "a") == b"1"


@pytest.mark.parametrize(
    "content_type",
    [
        FORM,
        f"{FORM}; charset=utf-8",
        f"{FORM};charset=UTF-8",
        "Application/X-WWW-Form-Urlencoded",  # media types are case-insensitive
    ],
)
def test_form_content_types_accepted(client, content_type: str):
    call(client, "POST", "/set", body=b"a=1", content_type=content_type)
    assert get_value(client, "a") == b"1"


def test_a_value_percent_encoded_may_take_three_times_its_size(client):
    """The default body limit admits a maximal value in %XX form."""
    body = b"k=" + quote("\x7f" * MAX_VALUE, safe="").encode()
    assert MAX_VALUE * 3 < len(body) <= MAX_BODY
    call(client, "POST", "/set", body=body, content_type=FORM)
    assert get_value(client, "k") == b"\x7f" * MAX_VALUE


# -- HEAD /get, GET / ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "status"),
    [("key=k", 200), ("key=empty", 200), ("key=missing", 404), ("", 400), ("key=a&x=1", 400)],
)
def test_head_get_has_the_headers_of_get_and_no_body(client, query: str, status: int):
    call(client, "GET", "/set", "k=some%0Avalue&empty=")
    got = call(client, "GET", "/get", query, status=status)
    head = call(client, "HEAD", "/get", query, status=status)
    assert head.body == b""
    assert head.headerlist == got.headerlist
    assert head.headers["Content-Length"] == str(len(got.body))


def test_index_is_plain_text_usage(client):
    res = call(client, "GET", "/")
    usage = res.body.decode("utf-8")
    assert usage.count("\n") >= 3
    assert "/set?" in usage and "/get?key=" in usage
    head = call(client, "HEAD", "/")
    assert head.headerlist == res.headerlist


@BEFORE_STORAGE
@pytest.mark.parametrize(
    ("host", "shown"),
    [
        ("localhost:4460", "localhost:4460"),
        ("127.0.0.1:4000", "127.0.0.1:4000"),
        ("localhost", "localhost"),  # port 80, or a proxy that dropped it
        ("LocalHost.:04460", "localhost:4460"),  # as the guard normalized it
        ("[0:0::1]:4460", "[::1]:4460"),
    ],
)
def test_index_names_the_host_and_port_the_client_used(client, host, shown):
    usage = call(client, "GET", "/", environ={"HTTP_HOST": host}).body.decode()
    assert f"  curl '{shown}/set?somekey=somevalue'" in usage
    assert f"The whole API: {shown}/openapi.json\n" in usage
    assert usage == USAGE.format(server=shown)  # every example names it


@BEFORE_STORAGE
def test_index_without_a_guarded_host_names_the_configured_address(make_settings):
    handlers = Handlers(None, make_settings(host="::1", port=4471))
    usage = handlers.index(Request({"REQUEST_METHOD": "GET"})).body.decode()
    assert "The whole API: [::1]:4471/openapi.json\n" in usage


def test_empty_path_is_the_index(client):
    assert call(client, "GET", "").body == call(client, "GET", "/").body


# -- 400 for /set: nothing stored -----------------------------------------------------

# (id, bad pair or pairs, words the one-line message holds).  Each is sent
# alone, after two good pairs in the query, and in a POST body after two
# good pairs: every time with a 400 and nothing stored.
SET_BAD = [
    ("no-equals", "a", "'='"),
    ("no-equals-encoded", "a%3D1", "'='"),
    ("empty-key", "=v", "empty"),
    ("empty-key-and-value", "=", "empty"),
    ("duplicate", "k=1&k=2", "more than once"),
    ("duplicate-after-decoding", "k=1&%6B=2", "more than once"),
    ("duplicate-empty-values", "k=&k=", "more than once"),
    ("escape-zz", "k=%zz", "percent-escape"),
    ("escape-zz-in-key", "%zz=1", "percent-escape"),
    ("escape-4-at-end", "k=%4", "percent-escape"),
    ("escape-4-before-pair", "k=%4&x=1", "percent-escape"),
    ("escape-4g", "k=%4g", "percent-escape"),
    ("escape-lone", "k=%", "percent-escape"),
    ("escape-lone-mid", "k=a%b", "percent-escape"),
    ("escape-lone-key", "%=1", "percent-escape"),
    ("escape-plus-sign", "k=%+1", "percent-escape"),
    ("utf8-ff", "k=%ff", "UTF-8"),
    ("utf8-FF-in-key", "%FF=1", "UTF-8"),
    ("utf8-c328", "k=%c3%28", "UTF-8"),
    ("utf8-truncated", "k=%c3", "UTF-8"),
    ("utf8-overlong", "k=%c0%af", "UTF-8"),
    ("utf8-surrogate", "k=%ed%a0%80", "UTF-8"),
    ("utf8-beyond-unicode", "k=%f4%90%80%80", "UTF-8"),
    ("utf8-raw-ff", "k=\xff", "UTF-8"),
    ("utf8-raw-c328", "\xc3(=1", "UTF-8"),
    ("control-nul", "%00=1", "control"),
    ("control-01", "a%01b=1", "control"),
    ("control-tab", "%09=1", "control"),
    ("control-lf", "a%0Ab=1", "control"),
    ("control-cr", "a%0Db=1", "control"),
    ("control-1f", "a%1F=1", "control"),
    ("control-del", "a%7F=1", "control"),
    ("control-raw-01", "a\x01b=1", "control"),
    ("control-c1-nel", "a%C2%85=1", "control"),  # C1 controls too: they break logs alike
    ("key-too-long-ascii", "k" * (MAX_KEY + 1) + "=1", "1025 bytes"),
    ("key-too-long-utf8", "%C3%A9" * (MAX_KEY // 2) + "a=1", "1025 bytes"),
    ("key-too-long-fewer-chars", "%C3%A9" * 600 + "=1", "1200 bytes"),  # 600 characters
    ("key-too-long-raw-utf8", "\xe2\x82\xac" * 342 + "=1", "1026 bytes"),
]

PLACEMENTS = ["alone", "third-pair-in-query", "third-pair-in-body", "query-before-good-body"]


def send_set(client, placement: str, bad: str, status: int) -> webtest.TestResponse:
    if placement == "alone":
        return call(client, "GET", "/set", bad, status=status)
    if placement == "third-pair-in-query":
        return call(client, "GET", "/set", f"a=new&b=new&{bad}", status=status)
    if placement == "third-pair-in-body":
        body = f"a=new&b=new&{bad}".encode("latin-1")
        return call(client, "POST", "/set", "n=new", body=body, content_type=FORM, status=status)
    assert placement == "query-before-good-body"
    return call(client, "POST", "/set", bad, body=b"a=new&b=new", content_type=FORM, status=status)


@BEFORE_STORAGE
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize(("bad", "words"), [c[1:] for c in SET_BAD], ids=[c[0] for c in SET_BAD])
def test_set_400_stores_nothing(seeded, snapshot, placement: str, bad: str, words: str):
    client, before = seeded
    res = send_set(client, placement, bad, 400)
    check_message(res, words)
    assert snapshot() == before
    assert get_value(client, "a") == b"old" and get_value(client, "n") is None


def test_key_of_one_space_is_a_key(client):
    call(client, "GET", "/set", "+=v")
    assert get_value(client, "+") == b"v"


@pytest.mark.parametrize("query", ["", "&", "&&&"], ids=["empty", "one-amp", "amps"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_set_without_pairs_is_400(seeded, snapshot, method: str, query: str):
    client, before = seeded
    res = call(client, method, "/set", query, status=400)
    check_message(res, "nothing to store")
    assert snapshot() == before


def test_post_empty_form_body_without_pairs_is_400(seeded, snapshot):
    client, before = seeded
    res = call(client, "POST", "/set", body=b"&", content_type=FORM, status=400)
    check_message(res, "nothing to store")
    assert snapshot() == before


def test_duplicate_key_across_query_and_body_is_400(seeded, snapshot):
    client, before = seeded
    res = call(client, "POST", "/set", "k=1&a=new", body=b"x=2&k=3", content_type=FORM, status=400)
    check_message(res, "more than once", "'k'")
    assert snapshot() == before


def test_query_string_that_is_not_bytes_is_400(seeded, snapshot):
    """A server breaking PEP 3333 (text beyond latin-1) gets a 400, not a 500."""
    client, before = seeded
    check_message(call(client, "GET", "/set", "k=\u20ac", status=400))
    assert snapshot() == before


# -- 413 ---------------------------------------------------------------------------------

VALUE_TOO_BIG = [
    ("ascii", "v" * (MAX_VALUE + 1)),
    ("utf8-bytes-not-characters", "%C3%A9" * (MAX_VALUE // 2) + "x"),
    ("escapes", "%00" * (MAX_VALUE + 1)),
]


@BEFORE_STORAGE
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("value", [v for _, v in VALUE_TOO_BIG], ids=[i for i, _ in VALUE_TOO_BIG])
def test_value_over_max_value_bytes_is_413(seeded, snapshot, placement: str, value: str):
    client, before = seeded
    res = send_set(client, placement, f"big={value}", 413)
    check_message(res, str(MAX_VALUE + 1), str(MAX_VALUE))
    assert snapshot() == before


class ExplodingInput:
    """A wsgi.input that fails the test if anything reads it."""

    def __init__(self) -> None:
        self.touched = False

    def read(self, *args):
        self.touched = True
        raise AssertionError("the body was read")

    readline = readlines = read

    def __iter__(self):
        return self.read()


@BEFORE_STORAGE
@pytest.mark.parametrize("length", [MAX_BODY + 1, 10 * 1024**3])
def test_body_over_max_body_bytes_is_refused_before_reading(seeded, snapshot, length: int):
    client, before = seeded
    body = ExplodingInput()
    environ = {"wsgi.input": body, "CONTENT_LENGTH": str(length), "CONTENT_TYPE": FORM}
    res = call(client, "POST", "/set", "a=new", environ=environ, status=413)
    check_message(res, str(length), str(MAX_BODY))
    assert not body.touched
    assert snapshot() == before


def test_body_over_a_configured_limit_is_413(make_settings, snapshot):
    from kvapp import create_app

    app = create_app(make_settings(max_body_bytes=100))
    try:
        client = webtest.TestApp(app)
        call(client, "POST", "/set", body=b"k=" + b"x" * 98, content_type=FORM)  # exactly 100
        before = snapshot()
        res = call(
            client, "POST", "/set", "q=1", body=b"k=" + b"y" * 99, content_type=FORM, status=413
        )
        check_message(res, "101", "100")
        assert snapshot() == before
        assert get_value(client, "k") == b"x" * 98
    finally:
        app.close()


@BEFORE_STORAGE
@pytest.mark.parametrize(
    ("length", "body"),
    [("abc", b"a=1"), ("-1", b"a=1"), ("1e3", b"a=1"), ("10", b"a=1")],
    ids=["letters", "negative", "float", "short-body"],
)
def test_bad_content_length_is_400(seeded, unlinted, snapshot, length: str, body: bytes):
    _, before = seeded
    environ = {"wsgi.input": BytesIO(body), "CONTENT_LENGTH": length, "CONTENT_TYPE": FORM}
    check_message(call(unlinted, "POST", "/set", "n=1", environ=environ, status=400))
    assert snapshot() == before


# -- 415 ------------------------------------------------------------------------------------


@BEFORE_STORAGE
@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "text/plain",
        "text/plain; charset=utf-8",
        "multipart/form-data; boundary=x",
        "application/octet-stream",
        f"{FORM}; charset=iso-8859-1",
        None,  # a body with no type at all
    ],
)
def test_non_form_post_body_is_415(seeded, snapshot, content_type: str | None):
    client, before = seeded
    res = call(
        client, "POST", "/set", "a=new", body=b"b=new", content_type=content_type, status=415
    )
    check_message(res)
    assert snapshot() == before


# -- 400 for /get --------------------------------------------------------------------------

GET_BAD = [
    ("no-query", "", "key"),
    ("only-amp", "&", "key"),
    ("no-equals", "key", "'='"),
    ("empty-key", "key=", "empty"),
    ("two-keys", "key=a&key=b", "once"),
    ("same-key-twice", "key=a&key=a", "once"),
    ("other-parameter-after", "key=a&x=1", "'x'"),
    ("other-parameter-before", "x=1&key=a", "'x'"),
    ("only-other-parameter", "x=1", "'x'"),
    ("empty-parameter-name", "key=a&=1", "''"),
    ("wrong-case", "Key=a", "'Key'"),
    ("pair-without-equals-after", "key=a&x", "'='"),
    ("escape-zz", "key=%zz", "percent-escape"),
    ("escape-lone", "key=a%", "percent-escape"),
    ("escape-4", "key=%4", "percent-escape"),
    ("utf8-ff", "key=%ff", "UTF-8"),
    ("utf8-c328", "key=%c3%28", "UTF-8"),
    ("utf8-raw-ff", "key=\xff", "UTF-8"),
    ("control-nul", "key=a%00", "control"),
    ("control-lf", "key=a%0Ab", "control"),
    ("control-del", "key=%7F", "control"),
    ("key-too-long", "key=" + "k" * (MAX_KEY + 1), "1025 bytes"),
    ("key-too-long-utf8", "key=" + "%C3%A9" * 513, "1026 bytes"),
]


@BEFORE_STORAGE
@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize(("query", "words"), [c[1:] for c in GET_BAD], ids=[c[0] for c in GET_BAD])
def test_get_400(seeded, snapshot, method: str, query: str, words: str):
    client, before = seeded
    res = call(client, method, "/get", query, status=400)
    if method == "GET":
        check_message(res, words)
    assert snapshot() == before


def test_get_ignores_a_body(seeded):
    client, _ = seeded
    res = call(client, "GET", "/get", "key=a", body=b"key=b", content_type=FORM)
    assert res.body == b"old"


# -- 405 and 404 ----------------------------------------------------------------------------

METHODS_405 = [
    ("/set", "PUT", "GET, POST"),
    ("/set", "DELETE", "GET, POST"),
    ("/set", "PATCH", "GET, POST"),
    ("/set", "OPTIONS", "GET, POST"),
    ("/set", "HEAD", "GET, POST"),  # HEAD of a write would have to write
    ("/set", "TRACE", "GET, POST"),
    ("/get", "POST", "GET, HEAD"),
    ("/get", "PUT", "GET, HEAD"),
    ("/get", "DELETE", "GET, HEAD"),
    ("/get", "PATCH", "GET, HEAD"),
    ("/get", "OPTIONS", "GET, HEAD"),
    ("/", "POST", "GET, HEAD"),
]


@BEFORE_STORAGE
@pytest.mark.parametrize(("path", "method", "allow"), METHODS_405)
def test_other_methods_are_405_with_allow(seeded, snapshot, path: str, method: str, allow: str):
    client, before = seeded
    res = call(client, method, path, "key=a&a=new", body=b"b=new", content_type=FORM, status=405)
    allowed = [m.strip() for m in res.headers["Allow"].split(",")]
    assert sorted(allowed) == sorted(allow.split(", "))
    if method != "HEAD":
        check_message(res)
    assert snapshot() == before


@BEFORE_STORAGE
@pytest.mark.parametrize(
    ("path", "method", "allow"),
    [
        ("/set", "get", "GET, POST"),  # methods are case-sensitive (RFC 9110 section 9.1)
        ("/get", "get", "GET, HEAD"),
        ("/get", "PROPFIND", "GET, HEAD"),
    ],
)
def test_unusual_methods_are_405_with_allow(
    seeded, unlinted, snapshot, path: str, method: str, allow: str
):
    _, before = seeded
    res = call(unlinted, method, path, "key=a&a=new", status=405)
    assert res.headers["Allow"] == allow
    check_message(res)
    assert snapshot() == before


@BEFORE_STORAGE
@pytest.mark.parametrize(
    "path",
    ["/nope", "/set/", "/GET", "/SET", "/Set", "/get/", "/set/x", "//set", "/set.txt", "/index"],
)
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_other_paths_are_404(seeded, snapshot, method: str, path: str):
    client, before = seeded
    res = call(client, method, path, "a=new", body=b"b=new", content_type=FORM, status=404)
    check_message(res)
    assert snapshot() == before


# -- storage errors at the boundary ------------------------------------------------------------


@pytest.mark.backends("sqlite")
def test_full_database_is_507_and_stores_nothing(app, client, snapshot):
    call(client, "GET", "/set", "a=old")
    before = snapshot()
    writer = app.repository._writer
    writer.execute("PRAGMA max_page_count = 1")  # caps the file at its current size
    big = "x" * 200_000
    body = f"big={big}".encode()
    res = call(client, "POST", "/set", "a=new", body=body, content_type=FORM, status=507)
    check_message(res, "full")
    assert snapshot() == before
    assert get_value(client, "a") == b"old"  # reads keep working
    writer.execute("PRAGMA max_page_count = 1073741823")
    call(client, "POST", "/set", "a=new", body=f"big={big}".encode(), content_type=FORM)
    assert get_value(client, "a") == b"new"


@pytest.mark.backends("sqlite")
def test_locked_database_is_503_with_retry_after(make_settings, db_path, snapshot):
    from kvapp import create_app

    app = create_app(make_settings(busy_timeout_ms=50))
    try:
        client = webtest.TestApp(app)
        call(client, "GET", "/set", "a=old")
        before = snapshot()
        other = sqlite3.connect(db_path, isolation_level=None)
        try:
            other.execute("BEGIN EXCLUSIVE")
            res = call(client, "GET", "/set", "a=new&b=new", status=503)
            check_message(res, "locked")
            assert int(res.headers["Retry-After"]) >= 1
            assert get_value(client, "a") == b"old"  # reads keep working
            other.execute("ROLLBACK")
        finally:
            other.close()
        assert snapshot() == before
        call(client, "GET", "/set", "a=new")
        assert get_value(client, "a") == b"new"
    finally:
        app.close()


# -- properties ------------------------------------------------------------------------------

keys = st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=MAX_KEY // 4)
values = st.text(st.characters(exclude_categories=("Cs",)))
hypothesis_fixtures = hypothesis_settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@hypothesis_fixtures
@given(key=keys, value=values)
def test_any_key_and_value_round_trip_through_the_query(client, key: str, value: str):
    res = call(client, "GET", "/set", f"{quote(key)}={quote(value)}")
    assert res.body == b"stored 1 key\n"
    got = call(client, "GET", "/get", f"key={quote(key, safe='')}")
    assert got.body == value.encode("utf-8")
    assert got.headers["Content-Length"] == str(len(value.encode("utf-8")))


@hypothesis_fixtures
@given(pairs=st.dictionaries(keys, values, min_size=1, max_size=5))
def test_any_pairs_round_trip_through_a_form_body(client, pairs: dict[str, str]):
    body = "&".join(f"{quote_plus(k)}={quote_plus(v)}" for k, v in pairs.items())
    call(client, "POST", "/set", body=body.encode("ascii"), content_type=FORM)
    for key, value in pairs.items():
        assert get_value(client, quote(key, safe="")) == value.encode("utf-8")


@hypothesis_fixtures
@given(value=st.binary(max_size=64))
def test_any_bytes_are_stored_exactly_or_refused_whole(client, snapshot, value: bytes):
    before = snapshot()
    encoded = quote(value, safe="")
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        call(client, "GET", "/set", f"first=1&bytes={encoded}", status=400)
        assert snapshot() == before
    else:
        call(client, "GET", "/set", f"first=1&bytes={encoded}")
        assert get_value(client, "bytes") == value
