"""The access log: one line per request with its fields, and never a secret."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import threading
import time

import pytest
import webtest
from helpers import ROOT

from kvapp import create_app
from kvapp.web.logs import PIPE_BUF, LineWriter, redact, setup_logging, target

TOKEN = "Zq3-v9_kT2.xW~p+7/Lm"
FORM = "application/x-www-form-urlencoded"
LINE = re.compile(
    r'^(?P<client>\S+) "(?P<method>\S+) (?P<target>\S+)" (?P<status>\d{3}) (?P<bytes>\d+)'
    r" (?P<ms>\d+\.\d)ms$"
)


@pytest.fixture
def make_client(make_settings):
    apps = []

    def make(**overrides) -> webtest.TestApp:
        application = create_app(make_settings(**overrides))
        apps.append(application)
        return webtest.TestApp(application, extra_environ={"REMOTE_ADDR": "192.0.2.7"})

    yield make
    for application in apps:
        application.close()


def access_lines(caplog) -> list[re.Match]:
    records = [r for r in caplog.records if r.name == "kvapp.access"]
    matches = [LINE.match(r.getMessage()) for r in records]
    assert all(matches), [r.getMessage() for r in records]
    assert all(r.levelno == logging.INFO for r in records)
    return matches


def test_one_line_per_request_with_every_field(make_client, caplog):
    client = make_client()
    caplog.set_level(logging.INFO, logger="kvapp.access")
    responses = [
        client.get("/set?name=v"),
        client.get("/get?key=name"),
        client.head("/get?key=name"),
        client.get("/nope", expect_errors=True),
        client.post("/set", {"a": "1"}),
    ]
    lines = access_lines(caplog)
    assert len(lines) == len(responses)
    got = [
        (m["client"], m["method"], m["target"], int(m["status"]), int(m["bytes"])) for m in lines
    ]
    assert got == [
        ("192.0.2.7", "GET", "/set?name=***", 200, len(responses[0].body)),
        ("192.0.2.7", "GET", "/get?key=***", 200, 1),
        ("192.0.2.7", "HEAD", "/get?key=***", 200, 0),
        ("192.0.2.7", "GET", "/nope", 404, len(responses[3].body)),
        ("192.0.2.7", "POST", "/set", 200, len(responses[4].body)),
    ]


SECRET = "hunter2-S3CRET"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", f"/set?password={SECRET}&user=alice", None),
        ("GET", f"/set?a=1&password={SECRET}", None),
        ("GET", f"/set?password={SECRET}&password={SECRET}", None),  # 400 too
        ("GET", f"/set?password=%{SECRET}", None),  # malformed: 400, still redacted
        ("POST", "/set", f"password={SECRET}".encode()),
        ("POST", f"/set?x={SECRET}", f"password={SECRET}".encode()),
        ("GET", f"/get?key={SECRET}", None),
    ],
)
def test_values_never_reach_the_log(make_client, caplog, method, path, body):
    client = make_client()
    caplog.set_level(logging.DEBUG)
    kwargs = {} if body is None else {"body": body, "content_type": FORM}
    client.request(path, method=method, expect_errors=True, **kwargs)
    (line,) = access_lines(caplog)
    assert SECRET not in caplog.text
    assert line["target"].partition("?")[0] == path.partition("?")[0]


@pytest.mark.parametrize("authorization", [f"Bearer {TOKEN}", "Bearer wrong-token-1234567890"])
def test_the_token_never_reaches_the_log(make_client, caplog, authorization):
    client = make_client(auth_token=TOKEN)
    caplog.set_level(logging.DEBUG)
    client.get("/set?k=v", headers={"Authorization": authorization}, expect_errors=True)
    assert len(access_lines(caplog)) == 1
    assert TOKEN not in caplog.text
    assert authorization.split()[1] not in caplog.text


@pytest.mark.parametrize(
    ("path", "logged"),
    [
        ("/a%0Ab", "/a%0Ab"),  # a decoded newline cannot start a forged line
        ('/a"b c', "/a%22b%20c"),
        ("/%C3%A9", "/%C3%A9"),
        ("/x" + "y" * 5000, "/x" + "y" * 398 + "..."),
    ],
)
def test_paths_are_escaped_and_bounded(make_client, caplog, path, logged):
    caplog.set_level(logging.INFO, logger="kvapp.access")
    make_client().get(path, expect_errors=True)
    (line,) = access_lines(caplog)
    assert line["target"] == logged


@pytest.mark.parametrize(
    ("query", "redacted"),
    [
        ("a=1&b=2", "a=***&b=***"),
        ("a=&b", "a=***&b"),
        ("a=1=2", "a=***"),
        ("&&a=1&", "&&a=***&"),
        ("", ""),
        ("k%3Dx=v", "k%3Dx=***"),
    ],
)
def test_redact_keeps_names_only(query, redacted):
    assert redact(query) == redacted


def test_target_of_a_query_is_bounded():
    text = target({"PATH_INFO": "/set", "QUERY_STRING": "k" * 10_000 + "=v"})
    assert len(text) == 403 and text.endswith("...")


def test_access_log_off_writes_nothing(make_client, caplog):
    client = make_client(access_log=False)
    caplog.set_level(logging.DEBUG)
    client.get("/set?k=v")
    client.get("/get?key=k")
    assert [r for r in caplog.records if r.name == "kvapp.access"] == []


@pytest.fixture
def restore_kvapp_levels():
    loggers = [logging.getLogger(name) for name in ("kvapp", "kvapp.access")]
    levels = [logger.level for logger in loggers]
    yield
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


@pytest.mark.usefixtures("restore_kvapp_levels")
@pytest.mark.parametrize("access_log", [True, False])
def test_access_log_alone_switches_the_access_log_whatever_log_level(
    make_client, make_settings, caplog, access_log
):
    settings = make_settings(log_level="WARNING", access_log=access_log)
    setup_logging(settings)
    client = make_client(log_level="WARNING", access_log=access_log)
    client.get("/get?key=k", status=404)
    logging.getLogger("kvapp.sweeper").info("an INFO record of kvapp's own")
    lines = access_lines(caplog)
    assert [(m["method"], m["target"], m["status"]) for m in lines] == (
        [("GET", "/get?key=***", "404")] if access_log else []
    )
    # log_level still quiets kvapp's own records below WARNING.
    assert [r for r in caplog.records if r.name == "kvapp.sweeper"] == []


# When kvapp owns the log output (wsgi.py, python -m kvapp serve), access lines
# skip logging's records and formatter; they must read exactly like the rest.
OWN_OUTPUT = """
import logging, sys, webtest
from kvapp import create_app
from kvapp.config import load_config
from kvapp.web.logs import setup_logging
settings = load_config(environ={"KVAPP_DATABASE": sys.argv[1]})
setup_logging(settings)
client = webtest.TestApp(create_app(settings), extra_environ={"REMOTE_ADDR": "192.0.2.7"})
client.get("/set?k=v")
client.get("/get?key=k")
client.get("/kv/%22", status=404)
logging.getLogger("kvapp.sweeper").warning("a warning with %s", "arguments")
"""
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"


def test_kvapp_own_log_output_writes_every_line_in_one_format(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", OWN_OUTPUT, str(tmp_path / "kv.sqlite3")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    lines = result.stderr.splitlines()
    assert len(lines) == 4, result.stderr
    for line in lines:
        assert re.match(rf"{STAMP} (INFO|WARNING) kvapp\.\S+: ", line), line
    assert [line.split(" ", 2)[2] for line in lines] == [
        'INFO kvapp.access: 192.0.2.7 "GET /set?k=***" 200 13 ' + lines[0].rsplit(" ", 1)[1],
        'INFO kvapp.access: 192.0.2.7 "GET /get?key=***" 200 1 ' + lines[1].rsplit(" ", 1)[1],
        'INFO kvapp.access: 192.0.2.7 "GET /kv/%22" 404 ' + " ".join(lines[2].rsplit(" ", 2)[1:]),
        "WARNING kvapp.sweeper: a warning with arguments",
    ]
    assert all(LINE.match(line.split(": ", 1)[1]) for line in lines[:3])


class Recorder:
    """Stands in for os.write: keeps each call's bytes."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []

    def __call__(self, fd: int, data: bytes) -> int:
        self.calls.append(bytes(data))
        return len(data)


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_a_line_after_a_quiet_spell_is_written_at_once():
    recorder = Recorder()
    writer = LineWriter(99, flush_interval=3600, _write=recorder)
    writer.write("first\n")
    assert recorder.calls == [b"first\n"]


@pytest.mark.parametrize("uptime", [0.0, 0.5, 59.0, 3599.0, 1e9])
def test_the_first_line_is_written_at_once_whatever_the_machine_uptime(uptime):
    # time.monotonic() counts from boot: a fresh CI machine reads a few seconds.
    recorder = Recorder()
    writer = LineWriter(99, flush_interval=3600, _write=recorder, _monotonic=lambda: uptime)
    writer.write("first\n")
    assert recorder.calls == [b"first\n"]


def test_a_burst_is_written_in_few_calls_of_whole_lines_none_lost():
    recorder = Recorder()
    writer = LineWriter(99, flush_interval=0.05, _write=recorder)
    lines = [f"thread {t} line {n} " + "x" * (n % 300) + "\n" for t in range(4) for n in range(500)]

    def send(t: int) -> None:
        for line in lines[t * 500 : (t + 1) * 500]:
            writer.write(line)

    threads = [threading.Thread(target=send, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait_for(lambda: b"".join(recorder.calls).count(b"\n") == len(lines), "every line")
    written = b"".join(recorder.calls).decode().splitlines(keepends=True)
    assert sorted(written) == sorted(lines)
    # In each thread's order, whole lines per call, at most PIPE_BUF bytes per call.
    for t in range(4):
        assert [line for line in written if line.startswith(f"thread {t} ")] == lines[
            t * 500 : (t + 1) * 500
        ]
    assert all(call.endswith(b"\n") and len(call) <= PIPE_BUF for call in recorder.calls)
    assert len(recorder.calls) < len(lines) / 5


def test_a_warning_is_written_at_once_after_the_lines_queued_before_it():
    recorder = Recorder()
    writer = LineWriter(99, flush_interval=3600, _write=recorder)
    writer.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    writer.write("first\n")  # written: the log was quiet
    writer.write("queued\n")
    assert recorder.calls == [b"first\n"]
    writer.handle(logging.LogRecord("kvapp", logging.WARNING, "", 0, "careful", (), None))
    assert b"".join(recorder.calls) == b"first\nqueued\nWARNING careful\n"


BURST_AT_EXIT = """
import sys
from kvapp.config import load_config
from kvapp.web.logs import log_request, setup_logging
setup_logging(load_config(environ={"KVAPP_DATABASE": sys.argv[1]}))
for n in range(300):
    log_request({"REQUEST_METHOD": "GET", "PATH_INFO": f"/n{n}"}, 200, 0, 0.0)
"""


def test_lines_queued_at_exit_are_written(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", BURST_AT_EXIT, str(tmp_path / "kv.sqlite3")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert [line.split('"')[1] for line in result.stderr.splitlines()] == [
        f"GET /n{n}" for n in range(300)
    ]
