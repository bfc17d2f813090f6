"""Every answer is inert text: never HTML, never sniffed, never a traceback, never long."""

from __future__ import annotations

import logging

import pytest
import webtest

from kvapp import create_app
from kvapp.store.base import StorageBusy, StorageFull
from kvapp.store.feed import Feed
from kvapp.web.app import App

TOKEN = "Zq3-v9_kT2.xW~p+7/Lm"
FORM = "application/x-www-form-urlencoded"
HTML = "<!doctype html><html><script>alert(document.domain)</script></html>"


class BrokenRepository:
    """A repository double whose every read and write raises exc."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.feed = Feed(lambda timeout: False, lambda: 0)

    def get(self, key):
        raise self.exc

    def set_many(self, items):
        raise self.exc

    def close(self) -> None:
        pass


@pytest.fixture
def make_client(make_settings):
    """Return a function building a client for one kind of app."""
    apps = []

    def make(kind: str = "default") -> webtest.TestApp:
        overrides = {
            "default": {},
            "token": {"auth_token": TOKEN},
            "small": {"max_value_bytes": 4, "max_body_bytes": 64},
        }
        if kind in overrides:
            application = create_app(make_settings(**overrides[kind]))
        else:
            exc = {
                "500": RuntimeError("secret internals: /srv/kv password=hunter2"),
                "503": StorageBusy("the database is locked by another process: retry"),
                "507": StorageFull("the disk is full: nothing was stored; free space and retry"),
            }[kind]
            application = App(make_settings(), BrokenRepository(exc))
        apps.append(application)
        client = webtest.TestApp(application)
        if kind == "default":
            client.get("/set", {"k": "v", "page": HTML})
        return client

    yield make
    for application in apps:
        application.close()


# (app kind, method, path, request kwargs, expected status)
EVERY_ROUTE_AND_ERROR = [
    ("default", "GET", "/", {}, 200),
    ("default", "HEAD", "/", {}, 200),
    ("default", "GET", "/set?a=1", {}, 200),
    ("default", "POST", "/set", {"body": b"a=1", "content_type": FORM}, 200),
    ("default", "GET", "/get?key=k", {}, 200),
    ("default", "HEAD", "/get?key=k", {}, 200),
    ("default", "GET", "/get?key=page", {}, 200),  # a stored HTML page stays text
    ("default", "GET", "/set", {}, 400),
    ("default", "GET", "/get?key=%zz", {}, 400),
    ("default", "GET", "/", {"headers": {"Host": "evil.example"}}, 400),
    ("default", "GET", "/", {"headers": {"Host": "a b"}}, 400),
    ("token", "GET", "/", {}, 401),
    ("token", "GET", "/", {"headers": {"Authorization": "Bearer wrong-wrong-wrong"}}, 401),
    (
        "default",
        "POST",
        "/set",
        {"body": b"a=1", "content_type": FORM, "headers": {"Origin": "https://evil.example"}},
        403,
    ),
    ("default", "GET", "/set?a=1", {"headers": {"Sec-Fetch-Site": "cross-site"}}, 403),
    ("default", "GET", "/get?key=nope", {}, 404),
    ("default", "HEAD", "/get?key=nope", {}, 404),
    ("default", "GET", "/nope", {}, 404),
    ("default", "PUT", "/get", {}, 405),
    ("default", "DELETE", "/set", {}, 405),
    ("small", "GET", "/set?a=12345", {}, 413),
    ("small", "POST", "/set", {"body": b"a=" + b"1" * 100, "content_type": FORM}, 413),
    ("default", "POST", "/set", {"body": b"<p>", "content_type": "text/html"}, 415),
    ("500", "GET", "/get?key=k", {}, 500),
    ("500", "GET", "/set?k=v", {}, 500),
    ("503", "GET", "/set?k=v", {}, 503),
    ("507", "GET", "/set?k=v", {}, 507),
]


@pytest.mark.parametrize(
    ("kind", "method", "path", "kwargs", "status"),
    EVERY_ROUTE_AND_ERROR,
    ids=[f"{row[4]}-{row[1]}-{row[2]}" for row in EVERY_ROUTE_AND_ERROR],
)
def test_every_answer_is_inert_plain_text(make_client, kind, method, path, kwargs, status):
    client = make_client(kind)
    response = client.request(path, method=method, expect_errors=True, **kwargs)
    assert response.status_int == status
    headers = response.headers
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Content-Security-Policy"] == "default-src 'none'; sandbox"
    assert headers["Cache-Control"] == "no-store"
    if method == "HEAD":
        assert response.body == b""
    else:
        assert int(headers["Content-Length"]) == len(response.body)
    if status >= 400 and method != "HEAD":
        # One line that says what was wrong: no traceback, no markup.
        assert response.body.endswith(b"\n")
        assert response.body.count(b"\n") == 1
        assert b"Traceback" not in response.body
        assert not response.body.lstrip().startswith(b"<")


def test_stored_html_comes_back_as_text(make_client):
    response = make_client().get("/get?key=page")
    assert response.body == HTML.encode()
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"


def test_a_failing_handler_gives_a_generic_500_and_logs_the_traceback(make_client, caplog):
    client = make_client("500")
    with caplog.at_level(logging.ERROR, logger="kvapp"):
        response = client.get("/get?key=k", expect_errors=True)
    assert response.status_int == 500
    assert response.body == b"internal error; the server log has the details\n"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "unhandled error for 'GET' /get?key=***" in errors[0].getMessage()
    assert errors[0].exc_info and "secret internals" in str(errors[0].exc_info[1])


def test_storage_errors_keep_their_status_and_retry_after(make_client):
    response = make_client("503").get("/set?k=v", expect_errors=True)
    assert response.headers["Retry-After"] == "1"
    response = make_client("507").get("/set?k=v", expect_errors=True)
    assert response.body == b"the disk is full: nothing was stored; free space and retry\n"


HUGE = "x" * 100_000

# Requests carrying 100 KB of attacker text where an error message might quote it.
UNBOUNDED_INPUTS = [
    ("GET", f"/set?{HUGE}=1", {}, 400),  # key too long
    ("GET", f"/set?{HUGE}%01=1", {}, 400),  # control character in a long key
    ("GET", f"/set?a=1&{HUGE}=1&{HUGE}=2", {}, 400),
    ("GET", f"/get?{HUGE}=1", {}, 400),  # unknown parameter name
    ("GET", f"/get?key={HUGE}", {}, 400),
    ("GET", f"/get?key={HUGE[:1000]}", {}, 404),  # a long missing key is quoted short
    ("GET", f"/{HUGE}", {}, 404),
    ("PUT", f"/{HUGE}", {}, 404),
    ("GET", "/set?a=1", {"headers": {"Host": HUGE}}, 400),
    ("GET", "/set?a=1", {"headers": {"Host": HUGE[:200]}}, 400),
    ("GET", "/set?a=1", {"headers": {"Origin": "http://" + HUGE}}, 403),
    ("GET", "/set?a=1", {"headers": {"Sec-Fetch-Site": HUGE}}, 403),
    ("POST", "/set", {"body": b"a=1", "content_type": HUGE}, 415),
    ("POST", "/set", {"body": f"{HUGE}=1".encode(), "content_type": FORM}, 400),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "status"), UNBOUNDED_INPUTS)
def test_error_messages_do_not_echo_unbounded_input(make_client, method, path, kwargs, status):
    response = make_client().request(path, method=method, expect_errors=True, **kwargs)
    assert response.status_int == status
    assert len(response.body) < 200
    assert HUGE[:100].encode() not in response.body


@pytest.mark.parametrize("authorization", [None, "Bearer " + HUGE, HUGE, "Bearer " + TOKEN + HUGE])
def test_401_does_not_echo_the_credentials(make_client, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    response = make_client("token").get("/", headers=headers, expect_errors=True)
    assert response.status_int == 401
    assert len(response.body) < 200
    assert b"xxxx" not in response.body and TOKEN.encode() not in response.body
