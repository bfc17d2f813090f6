"""Watch in process: the event stream (GET /kv/?watch) and the long-poll (Prefer: wait).

The stream is the app's own iterator, pulled here one chunk at a time: a
pull returns at once when a change is waiting, and otherwise after the
next heartbeat.  Real servers, workers, nginx and PostgreSQL servers are in
tests/test_watch_server.py; kill -9 in tests/test_watch_crash.py.
"""

from __future__ import annotations

import base64
import json
import tempfile
import threading
import time
from urllib.parse import quote

import hypothesis.strategies as st
import pytest
import webob
import webtest
from helpers import ROOT, Clock
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from kvapp.config import load_config
from kvapp.store import open_store
from kvapp.store.base import WHOLE, Record
from kvapp.web import tail
from kvapp.web import watch as watch_module
from kvapp.web.app import App
from kvapp.web.responses import BadRequest
from kvapp.web.watch import parse_position

pytestmark = pytest.mark.backends("sqlite", "postgres")
BEFORE_STORAGE = pytest.mark.backends("sqlite")


class Stream:
    """One watch request to the app in process: its status, headers and events as they come."""

    def __init__(self, app: App, query: str = "", headers: dict[str, str] | None = None) -> None:
        environ = webob.Request.blank(f"/kv/?watch{query}", headers=headers or {}).environ
        answer: dict[str, object] = {}

        def start_response(status: str, response_headers: list[tuple[str, str]]) -> None:
            answer["status"], answer["headers"] = status, dict(response_headers)

        self.body = app(environ, start_response)
        self.status = answer["status"]
        self.headers = answer["headers"]
        self.chunks = iter(self.body)
        self.pending: list[tuple[str, str, dict]] = []

    def pull(self) -> bytes:
        return next(self.chunks)

    def events(self, count: int) -> list[tuple[str, str, dict]]:
        """Return the next count events as (id, event, data); skips comments.

        Fails after three heartbeats in a row without an event.
        """
        idle = 0
        while len(self.pending) < count:
            chunk = self.pull()
            idle = idle + 1 if chunk == b": keep-alive\n\n" else 0
            assert idle < 3, f"no event for three heartbeats; so far {self.pending}"
            for block in chunk.decode().split("\n\n"):
                fields = dict(
                    line.split(": ", 1) for line in block.split("\n") if line[:1] not in ":"
                )
                if fields:
                    self.pending.append((fields["id"], fields["event"], json.loads(fields["data"])))
        found, self.pending = self.pending[:count], self.pending[count:]
        return found

    def close(self) -> None:
        self.body.close()


@pytest.fixture
def app(make_settings, clock):
    """The app with a one-second heartbeat, three watcher slots, and time from clock."""
    settings = make_settings(watch_heartbeat_seconds=1, max_watchers=3)
    application = App(settings, open_store(settings, clock=clock))
    yield application
    application.close()


@pytest.fixture
def client(app) -> webtest.TestApp:
    return webtest.TestApp(app)


@pytest.fixture
def watch(app):
    streams: list[Stream] = []

    def open_stream(query: str = "", headers: dict[str, str] | None = None) -> Stream:
        streams.append(Stream(app, query, headers))
        return streams[-1]

    yield open_stream
    for stream in streams:
        stream.close()


def test_a_stream_without_a_position_starts_with_ready_at_the_current_revision(client, watch):
    client.put("/kv/a", b"1")
    client.put("/kv/b", b"2")
    stream = watch()
    assert stream.status == "200 OK"
    assert stream.headers["Content-Type"] == "text/event-stream"
    assert stream.headers["Cache-Control"] == "no-store"
    assert stream.headers["X-Accel-Buffering"] == "no"
    assert stream.headers["X-Content-Type-Options"] == "nosniff"
    assert "Content-Length" not in stream.headers
    assert stream.pull() == b'id: 2\nevent: ready\ndata: {"revision": 2}\n\n'
    client.put("/kv/c", b"3", headers={"Content-Type": "text/plain"})
    assert stream.pull() == (
        b'id: 3-0\nevent: put\ndata: {"key": "c", "revision": 3, "value": "3",'
        b' "content_type": "text/plain", "expires_at": null}\n\n'
    )


def test_each_change_of_a_write_is_one_event_and_deletes_say_not_expired(client, watch):
    stream = watch("&prefix=config/")
    stream.pull()  # ready
    client.get("/set?config/a=1&config/b=2&other=3")
    client.delete("/kv/config/a")
    client.put("/kv/elsewhere", b"x")
    client.put("/kv/config/c", "héllo".encode(), headers={"Content-Type": "text/plain"})
    assert stream.events(4) == [
        (
            "1-0",
            "put",
            {
                "key": "config/a",
                "revision": 1,
                "value": "1",
                "content_type": "text/plain; charset=utf-8",
                "expires_at": None,
            },
        ),
        (
            "1-1",
            "put",
            {
                "key": "config/b",
                "revision": 1,
                "value": "2",
                "content_type": "text/plain; charset=utf-8",
                "expires_at": None,
            },
        ),
        ("2-0", "delete", {"key": "config/a", "revision": 2, "expired": False}),
        (
            "4-0",
            "put",
            {
                "key": "config/c",
                "revision": 4,
                "value": "héllo",
                "content_type": "text/plain",
                "expires_at": None,
            },
        ),
    ]


def test_a_value_that_is_not_utf8_comes_as_value_base64(client, watch):
    stream = watch()
    stream.pull()
    value = b"\xff\x00\xfe\r\n"
    client.put("/kv/bin", value, headers={"Content-Type": "image/png"})
    ((_, _, data),) = stream.events(1)
    assert "value" not in data
    assert base64.b64decode(data["value_base64"]) == value
    assert data["content_type"] == "image/png"


def test_a_ttl_gives_the_deadline_and_expiry_is_a_delete_event_marked_expired(
    client, watch, app, clock
):
    stream = watch()
    stream.pull()
    client.request("/kv/session?ttl=10", method="PUT", body=b"s")
    ((_, _, put),) = stream.events(1)
    assert put["expires_at"] == int(clock() * 1000) + 10_000
    clock.now += 10
    assert app.sweeper.sweep() == 1
    assert stream.events(1) == [
        ("2-0", "delete", {"key": "session", "revision": 2, "expired": True})
    ]


def test_resuming_sees_each_later_change_once_from_an_event_id_or_a_revision(client, watch):
    client.get("/set?a=1&b=2&c=3")  # revision 1: events 1-0, 1-1, 1-2
    client.put("/kv/d", b"4")  # revision 2
    mid = watch(headers={"Last-Event-ID": "1-0"})
    assert mid.pull() == b": resuming after 1-0\n\n"
    assert [event[0] for event in mid.events(3)] == ["1-1", "1-2", "2-0"]
    whole = watch("&since=1")
    assert [event[0] for event in whole.events(1)] == ["2-0"]
    # EventSource reconnects to the same URL and adds Last-Event-ID: it wins over since.
    both = watch("&since=0", headers={"Last-Event-ID": "1-2"})
    assert [event[0] for event in both.events(1)] == ["2-0"]
    client.put("/kv/e", b"5")
    for stream in (mid, whole, both):
        assert [event[0] for event in stream.events(1)] == ["3-0"]


def test_a_position_older_than_the_kept_history_is_410_naming_the_oldest(client, app):
    for n in range(5):
        client.put(f"/kv/k{n}", b"v")
    assert app.repository.trim_history(3600, 2) == 3  # keeps revisions 4 and 5
    answer = client.get("/kv/?watch&since=2", status=410)
    assert answer.content_type == "text/plain"
    assert "the oldest revision to resume from is 3" in answer.text
    assert "list the keys again" in answer.text
    assert "X-Kvapp-Revision" in answer.text
    problem = client.get(
        "/kv/?watch", headers={"Last-Event-ID": "1-0", "Accept": "application/json"}, status=410
    ).json
    assert problem["status"] == 410
    assert "resume from is 3" in problem["detail"]


def test_a_position_at_the_floor_resumes_without_a_gap(client, app, watch):
    for n in range(5):
        client.put(f"/kv/k{n}", b"v")
    app.repository.trim_history(3600, 2)
    stream = watch("&since=3")
    assert [event[0] for event in stream.events(2)] == ["4-0", "5-0"]


def test_a_position_ahead_of_the_store_is_410(client):
    client.put("/kv/a", b"1")
    assert "ahead of this store's revision 1" in client.get("/kv/?watch&since=2", status=410)


def test_a_listing_names_the_revision_to_watch_from(client, watch):
    client.get("/set?config/a=1&config/b=2")
    listing = client.get("/kv/?prefix=config/")
    revision = listing.headers["X-Kvapp-Revision"]
    client.put("/kv/config/c", b"3")
    stream = watch(f"&prefix=config/&since={revision}")
    assert [event[0] for event in stream.events(1)] == ["2-0"]


def test_an_idle_stream_sends_a_keep_alive_comment_each_heartbeat(watch):
    stream = watch()
    stream.pull()
    started = time.monotonic()
    assert stream.pull() == b": keep-alive\n\n"
    assert time.monotonic() - started >= 0.9  # watch_heartbeat_seconds = 1 here


def test_one_watcher_more_than_max_watchers_is_503_until_one_ends(client, watch):
    first, second, _ = watch(), watch(), watch()
    answer = client.get("/kv/?watch", status=503)
    assert answer.headers["Retry-After"] == "5"
    assert "max_watchers" in answer.text
    # A long-poll takes a slot too.
    client.put("/kv/k", b"v")
    client.get("/kv/k", headers={"If-None-Match": '"1"', "Prefer": "wait=1"}, status=503)
    first.close()
    third = watch()
    assert third.status == "200 OK"
    assert second.status == "200 OK"


def test_ending_the_streams_ends_every_stream(app, watch):
    stream = watch()
    stream.pull()
    app.end_streams()
    with pytest.raises(StopIteration):
        stream.pull()


def test_a_shutdown_between_a_long_polls_looks_and_its_wait_still_ends_it(make_settings, clock):
    settings = make_settings(watch_heartbeat_seconds=600, max_watchers=3)
    application = App(settings, open_store(settings, clock=clock))
    stops: list[bool] = []

    def client_gone() -> bool:
        # Asked right after the long-poll's look at closing: the stop comes now.
        if not stops:
            stops.append(True)
            application.end_streams()
        return False

    held = threading.Thread(
        target=application.watching.hold, args=(600, lambda: False, client_gone), daemon=True
    )
    # Another waiter on the feed first, woken once by its listener's first
    # look: that look would also wake the long-poll, and hide the race.
    feed, woken, done = application.repository.feed, threading.Event(), threading.Event()

    def keep_waiting() -> None:
        while not done.is_set():
            feed.wait(feed.version, 600)
            woken.set()

    keeper = threading.Thread(target=keep_waiting, daemon=True)
    try:
        keeper.start()
        assert woken.wait(30)
        held.start()
        held.join(30)  # not 600 s, nor a heartbeat
        assert not held.is_alive()
    finally:
        done.set()
        feed.notify()
        keeper.join(30)
        application.close()


@BEFORE_STORAGE
@pytest.mark.parametrize(
    ("query", "headers", "words"),
    [
        ("/kv/?watch=1", {}, "watch takes no value"),
        ("/kv/?watch&watch", {}, "at most once"),
        ("/kv/?watch&since=abc", {}, "since must be a revision"),
        ("/kv/?watch&since=-1", {}, "since must be a revision"),
        ("/kv/?watch&since=007", {}, "since must be a revision"),
        ("/kv/?watch&since=1&since=2", {}, "at most once"),
        ("/kv/?watch&since=99999999999999999999", {}, "out of range"),
        # Past 4,300 digits Python's int() raises ValueError: still a 400.
        ("/kv/?watch&since=" + "1" * 5000, {}, "out of range"),
        ("/kv/?watch", {"Last-Event-ID": "1" * 5000}, "out of range"),
        ("/kv/?watch", {"Last-Event-ID": "1-" + "1" * 5000}, "out of range"),
        # Last-Event-ID wins over since=, but a malformed since= is still refused.
        ("/kv/?watch&since=abc", {"Last-Event-ID": "1"}, "since must be a revision"),
        ("/kv/?watch", {"Last-Event-ID": "4-x"}, "Last-Event-ID must be"),
        ("/kv/?watch", {"Last-Event-ID": "4-0-0"}, "Last-Event-ID must be"),
        ("/kv/?watch&limit=3", {}, "this route takes prefix, since"),
        ("/kv/?watch&prefix=%FF", {}, "prefix"),
        ("/kv/?watch&prefix=a%00", {}, "control character"),
    ],
)
def test_a_malformed_watch_is_400_saying_what_is_wrong(client, query, headers, words):
    assert words in client.get(query, headers=headers, status=400).text


DIGITS = st.integers(0, 6000).map(lambda k: "9" * k) | st.text("0123456789", max_size=25)
POSITIONS = st.tuples(DIGITS, st.none() | DIGITS).map(
    lambda parts: parts[0] if parts[1] is None else f"{parts[0]}-{parts[1]}"
)


@given(st.text(max_size=30) | POSITIONS)
def test_any_position_is_read_or_refused_with_a_400(text):
    try:
        revision, n = parse_position(text, "since")
    except BadRequest:
        return
    assert f"{revision}-{n}" == text or (str(revision) == text and n == WHOLE)


@BEFORE_STORAGE
def test_head_of_a_watch_is_400(client):
    client.head("/kv/?watch", status=400)


# -- the long-poll ---------------------------------------------------------


def later(action, delay: float = 0.2) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(delay), action()))
    thread.start()
    return thread


def test_a_long_poll_answers_the_new_version_when_the_key_changes(client):
    client.put("/kv/config", b"old")
    writer = later(lambda: client.put("/kv/config", b"new", headers={"Content-Type": "a/b"}))
    answer = client.get("/kv/config", headers={"If-None-Match": '"1"', "Prefer": "wait=30"})
    writer.join()
    assert (answer.status_int, answer.body, answer.headers["ETag"]) == (200, b"new", '"2"')
    assert answer.headers["Preference-Applied"] == "wait=30"


def test_a_long_poll_answers_404_when_the_key_is_deleted(client):
    client.put("/kv/config", b"old")
    writer = later(lambda: client.delete("/kv/config"))
    answer = client.get(
        "/kv/config", headers={"If-None-Match": '"1"', "Prefer": "wait=30"}, status=404
    )
    writer.join()
    assert answer.headers["Preference-Applied"] == "wait=30"


def test_a_long_poll_answers_304_when_nothing_changes_in_time(client, make_settings):
    client.put("/kv/config", b"old")
    started = time.monotonic()
    answer = client.get(
        "/kv/config", headers={"If-None-Match": '"1"', "Prefer": "wait=1"}, status=304
    )
    assert time.monotonic() - started >= 0.9
    assert answer.headers["ETag"] == '"1"'
    assert answer.headers["Preference-Applied"] == "wait=1"


def test_a_long_poll_ignores_writes_of_other_keys(client):
    client.put("/kv/config", b"old")
    writer = later(lambda: client.put("/kv/other", b"x"))
    client.get("/kv/config", headers={"If-None-Match": '"1"', "Prefer": "wait=1"}, status=304)
    writer.join()


def test_a_long_poll_whose_version_is_already_old_answers_at_once(client):
    client.put("/kv/config", b"old")
    client.put("/kv/config", b"new")
    answer = client.get("/kv/config", headers={"If-None-Match": '"1"', "Prefer": "wait=60"})
    assert (answer.body, answer.headers["Preference-Applied"]) == (b"new", "wait=60")


def test_a_long_poll_whose_if_match_fails_answers_412_without_waiting(make_settings, clock):
    # RFC 9110 section 13.2.2: If-Match first.  Nothing changes the key, so a
    # long-poll that waited would hold its thread for the hour it asked for.
    settings = make_settings(max_wait_seconds=3600)
    application = App(settings, open_store(settings, clock=clock))
    client = webtest.TestApp(application)
    answers = []
    try:
        client.put("/kv/k", b"v")
        headers = {"If-Match": '"7"', "If-None-Match": '"1"', "Prefer": "wait=3600"}
        poll = threading.Thread(
            target=lambda: answers.append(client.get("/kv/k", headers=headers, status="*"))
        )
        poll.start()
        poll.join(30)
        assert not poll.is_alive(), "the long-poll waited instead of answering 412"
        assert answers[0].status_int == 412
        assert "Preference-Applied" not in answers[0].headers
    finally:
        application.close()  # ends a long-poll that is still waiting
        poll.join(30)


def test_a_wait_longer_than_max_wait_seconds_is_cut_to_it(make_settings, clock):
    application = App(make_settings(max_wait_seconds=1), open_store(make_settings()))
    client = webtest.TestApp(application)
    try:
        client.put("/kv/k", b"v")
        # Any number of seconds, of any length, is cut: 11 digits were ignored.
        # Leading zeros count for nothing (delta-seconds is 1*DIGIT).
        for wait, applied in [
            ("3600", 1),
            ("99999999999", 1),
            ("9" * 5000, 1),
            ("0" * 20 + "3600", 1),
            ("0" * 11, 0),
        ]:
            answer = client.get(
                "/kv/k", headers={"If-None-Match": '"1"', "Prefer": f"wait={wait}"}, status=304
            )
            assert answer.headers["Preference-Applied"] == f"wait={applied}"
    finally:
        application.close()


@BEFORE_STORAGE
@pytest.mark.parametrize(
    "prefer",
    [
        "",
        "respond-async",
        "wait=abc",
        "wait=-1",
        "wait=1.5",
        "return=minimal",
        # A wait inside another preference's quoted value is no wait.
        'foo="a,wait=1"',
        # A malformed header: none of its preferences is certain.
        'wait="1',
        "wait=1 x",
        "a b, wait=1",
        "wait=1, a b",
    ],
)
def test_without_a_usable_wait_preference_a_read_is_unchanged(client, prefer):
    client.put("/kv/k", b"v")
    headers = {"If-None-Match": '"1"'} | ({"Prefer": prefer} if prefer else {})
    answer = client.get("/kv/k", headers=headers, status=304)
    assert "Preference-Applied" not in answer.headers


@BEFORE_STORAGE
def test_a_wait_without_if_none_match_answers_at_once(client):
    client.put("/kv/k", b"v")
    answer = client.get("/kv/k", headers={"Prefer": "wait=60"})
    assert answer.body == b"v"
    assert "Preference-Applied" not in answer.headers


@BEFORE_STORAGE
def test_the_first_wait_of_a_prefer_header_counts(client):
    client.put("/kv/k", b"v")
    answer = client.get(
        "/kv/k",
        headers={"If-None-Match": '"1"', "Prefer": 'respond-async, WAIT="1"; x=y, wait=50'},
        status=304,
    )
    assert answer.headers["Preference-Applied"] == "wait=1"


# -- replaying the stream rebuilds the store ----------------------------------


KEYS = st.sampled_from(["a", "b", "c", "dir/é", "dir/f"])
VALUES = st.one_of(st.binary(max_size=8), st.text(max_size=8).map(str.encode))


class ReplayMachine(RuleBasedStateMachine):
    """One stream, open from revision 0, replayed into a dict after every step.

    After each step a sentinel write marks the end of what the step did, so
    the test reads exactly up to it, never waiting for a heartbeat.  The
    replayed dict, with each put's deadline applied at the clock's time,
    must equal what the store answers.
    """

    def __init__(self) -> None:
        super().__init__()
        self.folder = tempfile.TemporaryDirectory()
        settings = load_config(
            ROOT / "config.ini", environ={}, database=f"{self.folder.name}/kv.sqlite3"
        )
        self.clock = Clock()
        self.app = App(settings, open_store(settings, clock=self.clock))
        self.client = webtest.TestApp(self.app)
        self.stream = Stream(self.app, "&since=0")
        self.replayed: dict[str, tuple[bytes, str, int | None]] = {}
        self.steps = 0

    @rule(key=KEYS, value=VALUES, ttl=st.none() | st.integers(1, 3))
    def put(self, key, value, ttl):
        query = "" if ttl is None else f"?ttl={ttl}"
        self.client.put(f"/kv/{quote(key)}{query}", value, headers={"Content-Type": "a/b"})

    @rule(pairs=st.dictionaries(KEYS, st.text("xyz", max_size=3), min_size=1, max_size=3))
    def set_many(self, pairs):
        self.client.get("/set", params=pairs)

    @rule(key=KEYS)
    def delete(self, key):
        self.client.delete(f"/kv/{quote(key)}", status="*")

    @rule(seconds=st.integers(1, 3), sweep=st.booleans())
    def wait(self, seconds, sweep):
        self.clock.now += seconds
        if sweep:
            self.app.sweeper.sweep()

    @invariant()
    def replay_is_the_store(self):
        self.steps += 1
        sentinel = f"~{self.steps}"
        self.client.put("/kv/~sentinel", sentinel.encode(), headers={"Content-Type": "a/b"})
        while True:
            ((_, kind, data),) = self.stream.events(1)
            if kind == "put":
                value = data.get("value", "").encode() or base64.b64decode(
                    data.get("value_base64", "")
                )
                self.replayed[data["key"]] = (value, data["content_type"], data["expires_at"])
            else:
                self.replayed.pop(data["key"], None)
            if data["key"] == "~sentinel" and data.get("value") == sentinel:
                break
        now = int(self.clock() * 1000)
        expected = {
            key: (value, ctype)
            for key, (value, ctype, deadline) in self.replayed.items()
            if deadline is None or deadline > now
        }
        keys = self.client.get("/kv/").text.split("\n")[:-1]
        stored = {}
        for key in keys:
            answer = self.client.get(f"/kv/{quote(key)}")
            stored[key] = (answer.body, answer.headers["Content-Type"])
        assert stored == expected

    def teardown(self):
        self.stream.close()
        self.app.close()  # its store's close() waits for the feed's listener
        self.folder.cleanup()


@BEFORE_STORAGE
def test_replaying_the_stream_from_revision_0_rebuilds_the_store_at_every_step(monkeypatch):
    # Every step's changes and its sentinel come in one send, after which a
    # stream gathers for GATHER_SECONDS: at 0.2 s that was 60 s of waiting
    # per run.  Order and content do not depend on either pause.
    monkeypatch.setattr(watch_module, "GATHER_SECONDS", 0.001)
    monkeypatch.setattr(tail, "REFRESH_SECONDS", 0.001)
    run_state_machine_as_test(
        ReplayMachine, settings=hypothesis_settings(max_examples=30, stateful_step_count=20)
    )


@BEFORE_STORAGE
def test_a_value_with_unicode_line_breaks_stays_on_one_data_line(client, watch):
    stream = watch()
    stream.pull()
    value = "a\u2028b\u2029c\u0085d\r\ne"
    client.put("/kv/k%E2%80%A8", value.encode(), headers={"Content-Type": "text/plain"})
    chunk = stream.pull().decode()
    # id, event, data and the blank line, whatever splits the lines.
    assert chunk.splitlines() == chunk.split("\n")[:-1]
    assert len(chunk.splitlines()) == 4
    data = json.loads(chunk.splitlines()[2].removeprefix("data: "))
    assert (data["key"], data["value"]) == ("k\u2028", value)


# -- the tail: the newest changes in memory, shared by a process's watchers ------


def test_a_watcher_behind_the_tail_reads_the_change_log_in_order(client, watch, monkeypatch):
    monkeypatch.setattr(tail, "MAX_EVENTS", 4)
    behind = watch()
    behind.pull()
    client.put("/kv/k0", b"0")
    assert [event[0] for event in behind.events(1)] == ["1-0"]  # from the tail now
    for n in range(1, 11):
        client.put(f"/kv/k{n}", b"v")
    ahead = watch()
    ahead.pull()
    client.put("/kv/last", b"v")
    assert [event[0] for event in ahead.events(1)] == ["12-0"]  # the tail dropped 2 to 9
    ids = [event[0] for event in behind.events(11)]
    assert ids == [f"{revision}-0" for revision in range(2, 13)]


def test_a_load_ends_the_streams_that_predate_it(client, app, watch):
    stream = watch()
    stream.pull()
    client.put("/kv/a", b"1")
    assert [event[0] for event in stream.events(1)] == ["1-0"]
    app.repository.load([Record("b", b"2", "text/plain", 40, None)])
    with pytest.raises(StopIteration):
        stream.events(1)
    client.get("/kv/?watch", headers={"Last-Event-ID": "1-0"}, status=410)


def test_a_position_inside_a_revision_that_was_trimmed_is_410(client, app, watch):
    # Revision 1 holds two changes; once it is trimmed, 1-0 cannot resume: 1-1 is gone.
    client.get("/set?a=1&b=2")
    client.put("/kv/c", b"3")
    client.put("/kv/d", b"4")
    assert app.repository.trim_history(3600, 2) == 2  # revision 1, whole
    answer = client.get("/kv/?watch", headers={"Last-Event-ID": "1-0"}, status=410)
    assert "the oldest revision to resume from is 1" in answer.text
    assert watch(headers={"Last-Event-ID": "1"}).status == "200 OK"  # after all of it: fine


def test_catching_up_reads_the_change_log_a_bounded_page_at_a_time(client, watch):
    # Eight values of nearly 1 MiB of control characters, each 6 MiB once
    # escaped: read 1,000 changes at once, a stream from since=0 held them
    # all, encoded, in one send (one such client took a server past 1 GB).
    value = b"\x01" * (1024 * 1024 - 64)
    for n in range(8):
        client.put(f"/kv/big/{n}", value, headers={"Content-Type": "text/plain"})
    stream = watch("&since=0")
    stream.pull()  # the comment that starts a resumed stream
    seen = []
    while len(seen) < 8:
        chunk = stream.pull()
        count = chunk.count(b"\nevent: put\n")
        # A page ends after the change that takes its values to PAGE_BYTES.
        assert 1 <= count <= 2, count
        seen += [line for line in chunk.split(b"\n") if line.startswith(b"id: ")]
    assert seen == [f"id: {n + 1}-0".encode() for n in range(8)]


class HookedChannel:
    """What kvapp's waitress channel gives a request: client_gone, and a hook for its close."""

    def __init__(self) -> None:
        self.gone = False
        self.hook = None

    def client_gone(self) -> bool:
        return self.gone

    def when_closed(self, hook) -> None:
        self.hook = hook

    def close(self) -> None:
        self.gone = True
        self.hook()


@BEFORE_STORAGE
def test_a_busy_stream_whose_client_goes_ends_without_waiting_out_its_gather(
    app, client, monkeypatch
):
    # A busy stream sleeps between sends so that changes gather; the client's
    # close must wake it, or its slot stays taken and a reconnection gets 503.
    monkeypatch.setattr(watch_module, "GATHER_SECONDS", 60)
    channel = HookedChannel()
    environ = webob.Request.blank("/kv/?watch&since=0").environ
    environ["waitress.client_disconnected"] = channel.client_gone
    client.get("/set?a=1&b=2")  # two changes in one page: then the stream gathers
    body = app(environ, lambda status, headers: None)
    chunks = iter(body)
    next(chunks)  # the comment that starts a resumed stream
    assert next(chunks).count(b"\nevent: put\n") == 2
    ended = threading.Event()

    def read_on() -> None:
        for _ in chunks:
            pass
        ended.set()

    reader = threading.Thread(target=read_on)
    reader.start()
    time.sleep(0.1)  # into its gather: nothing more to send
    channel.close()
    reader.join(20)  # a hang mark, far below the 60 s gather
    assert ended.is_set()
    body.close()
    assert app.watching.active == 0
