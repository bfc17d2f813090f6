"""kill -9 while a watcher follows the change stream: resuming loses and repeats nothing.

`python -m kvapp serve` runs on an SQLite file.  Writer threads write keys
of their own with values of their own, by PUT /kv/{key} (one event per
revision) or by /set with several pairs (several events of one revision),
and keep a ledger: acknowledged (2xx; a PUT's ETag names its revision),
refused (any other answer: nothing stored), or unknown (the connection
broke: stored or not).  A watcher thread follows GET /kv/?watch on a raw
socket and parses the Server-Sent Events itself; whenever its stream ends
(a kill, or its own choice, which lands between two events of one revision
too) it reconnects with Last-Event-ID, retrying while the server is down.
Several times the server is SIGKILLed at a random moment and started again
on the same file (on a new free port, which the clients follow).

At the end the writers stop, the watcher resumes once more and reads until
a heartbeat says nothing more is coming.  Then the events must be in
strictly increasing (revision, n) order with no duplicate across all its
streams; every acknowledged write must be there exactly once (all its
pairs, in one revision, with their values), no refused write, each unknown
write at most once and whole, and nothing else; the last event is of the
store's revision; and the keys served are what replaying the events gives.

WATCH_CRASH_ROUNDS (default 5) and WATCH_CRASH_SEED (default fixed) make a
run longer or different; the seed is printed.
"""

from __future__ import annotations

import base64
import functools
import http.client
import json
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote, urlencode

import pytest
from helpers import KvappServer

from kvapp.web.watch import HEARTBEAT

pytestmark = pytest.mark.slow

ROUNDS = int(os.environ.get("WATCH_CRASH_ROUNDS", "5"))
SEED = int(os.environ.get("WATCH_CRASH_SEED", "20261206"))
WRITERS = 4  # even ones PUT one key, odd ones /set SET_PAIRS keys
SET_PAIRS = 3
# The stream sends a heartbeat after this many idle seconds (the setting's minimum).
ENV = {"KVAPP_WATCH_HEARTBEAT_SECONDS": "1"}
HEARTBEAT_LINE = HEARTBEAT.decode().strip()
# Generous deadlines: they only bound a wait for something that must happen.
DEADLINE_S = 30.0
# A stream silent for this long (many heartbeats) counts as dead: reconnect.
SILENT_S = 10.0


class Target:
    """The port of the server now running (the clients follow it across restarts)."""

    def __init__(self, port: int) -> None:
        self.port = port


def recording_errors(errors: list[BaseException], function: Callable[[], None]) -> None:
    """Run function (a thread's body); keep what it raised, for the test to report."""
    try:
        function()
    except BaseException as exc:
        errors.append(exc)
        raise


# -- the writers -------------------------------------------------------------------


@dataclass(frozen=True)
class Write:
    """One request: a PUT of one key, or a /set of several; keys are never written twice."""

    number: int
    pairs: tuple[tuple[str, bytes], ...]

    @property
    def is_put(self) -> bool:
        return len(self.pairs) == 1


@dataclass
class Ledger:
    """Every write sent, and what its answer said."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    writes: list[Write] = field(default_factory=list)
    acknowledged: dict[int, int | None] = field(default_factory=dict)  # -> a PUT's revision
    refused: dict[int, int] = field(default_factory=dict)  # -> status

    def new_write(self, thread_no: int) -> Write:
        with self.lock:
            number = len(self.writes)
            pad = "x" * (number * 37 % 300)  # values of varied size
            if thread_no % 2 == 0:
                value = f"{number}é{pad}".encode()
                if number % 5 == 0:
                    value += b"\xff"  # not UTF-8: the event carries it as value_base64
                pairs: tuple[tuple[str, bytes], ...] = ((f"w{thread_no}-{number}", value),)
            else:
                pairs = tuple(
                    (f"w{thread_no}-{number}.{slot}", f"{number}.{slot}é{pad}".encode())
                    for slot in range(SET_PAIRS)
                )
            write = Write(number, pairs)
            self.writes.append(write)
            return write

    def answered(self, write: Write, status: int, etag: str | None) -> None:
        with self.lock:
            if 200 <= status < 300:
                revision = int((etag or "").strip('"')) if write.is_put else None
                self.acknowledged[write.number] = revision
            else:
                self.refused[write.number] = status

    @property
    def unknown(self) -> set[int]:
        return {write.number for write in self.writes} - set(self.acknowledged) - set(self.refused)


def send(conn: http.client.HTTPConnection, write: Write) -> http.client.HTTPResponse:
    if write.is_put:
        ((key, value),) = write.pairs
        conn.request("PUT", f"/kv/{quote(key)}", body=value)
    else:
        conn.request("GET", "/set?" + urlencode(write.pairs, quote_via=quote))
    response = conn.getresponse()
    response.read()
    return response


def writer_loop(thread_no: int, target: Target, ledger: Ledger, stop: threading.Event) -> None:
    """Write new keys on one keep-alive connection, reconnecting to whichever server runs."""
    conn: http.client.HTTPConnection | None = None
    while not stop.is_set():
        port = target.port
        if conn is not None and (conn.port != port or conn.sock is None):
            conn.close()
            conn = None
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_S)
            try:
                conn.connect()
            except OSError:
                conn = None
                time.sleep(0.02)  # the server is down; no write was sent
                continue
        write = ledger.new_write(thread_no)
        try:
            response = send(conn, write)
        except (OSError, http.client.HTTPException):
            conn.close()  # killed mid-request: this write's outcome is unknown
            conn = None
            continue
        ledger.answered(write, response.status, response.getheader("ETag"))
        time.sleep(0.002)  # leave the shared CPU some room: what counts is the kills
    if conn is not None:
        conn.close()


# -- the watcher -------------------------------------------------------------------


class StreamEnded(Exception):
    """The server closed the stream or the connection."""


class EventStream:
    """One GET /kv/?watch on a raw socket: its chunked body parsed as Server-Sent Events."""

    def __init__(self, port: int, last_id: str | None) -> None:
        lines = ["GET /kv/?watch HTTP/1.1", "Host: 127.0.0.1", "Accept: text/event-stream"]
        if last_id is not None:
            lines.append(f"Last-Event-ID: {last_id}")
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=0.5)
        try:
            self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        except OSError:
            self.sock.close()
            raise
        self.raw = b""  # received, not yet de-chunked
        self.text = b""  # de-chunked, not yet split into lines
        self.fields: dict[str, str] = {}  # the event being read
        self.heard = time.monotonic()  # when the last bytes came

    def close(self) -> None:
        self.sock.close()

    def _receive(self) -> None:
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            if time.monotonic() - self.heard > SILENT_S:
                raise StreamEnded("silent for many heartbeats") from None
            return
        if not data:
            raise StreamEnded("end of file")
        self.heard = time.monotonic()
        self.raw += data

    def head(self) -> int:
        """Read the status line and headers; return the status."""
        deadline = time.monotonic() + DEADLINE_S
        while b"\r\n\r\n" not in self.raw:
            if time.monotonic() > deadline:
                raise StreamEnded("no answer")
            self._receive()
        head, _, self.raw = self.raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        pairs = (line.partition(":") for line in lines[1:])
        headers = {name.strip().lower(): value.strip() for name, _, value in pairs}
        status = int(lines[0].split()[1])
        if status == 200:
            assert headers.get("content-type") == "text/event-stream", headers
            assert headers.get("transfer-encoding") == "chunked", headers
        return status

    def items(self) -> list[tuple[str, ...]]:
        """Return the ("event", id, name, data) and ("comment", line) complete now.

        Receives once if nothing complete is buffered.  An event counts once
        its blank line has come, as EventSource dispatches it: one cut off
        by a kill is not seen (nor its id).
        """
        found = self._parse()
        if not found:
            self._receive()
            found = self._parse()
        return found

    def _parse(self) -> list[tuple[str, ...]]:
        while True:  # de-chunk what is complete
            size_end = self.raw.find(b"\r\n")
            if size_end < 0:
                break
            size = int(self.raw[:size_end].split(b";")[0], 16)
            end = size_end + 2 + size + 2
            if len(self.raw) < end:
                break
            if size == 0:
                raise StreamEnded("the server ended the stream")
            assert self.raw[end - 2 : end] == b"\r\n", self.raw[:end]
            self.text += self.raw[size_end + 2 : end - 2]
            self.raw = self.raw[end:]
        *lines, self.text = self.text.split(b"\n")
        found: list[tuple[str, ...]] = []
        for raw_line in lines:
            line = raw_line.decode("utf-8")
            if not line:
                if self.fields:
                    fields, self.fields = self.fields, {}
                    found.append(("event", fields["id"], fields["event"], fields["data"]))
            elif line.startswith(":"):
                found.append(("comment", line))
            else:
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                assert name in ("id", "event", "data") and name not in self.fields, line
                self.fields[name] = value
        return found


def position_of(event_id: str) -> tuple[int, int]:
    revision, _, n = event_id.partition("-")
    return int(revision), int(n)


class Watcher:
    """Follows the stream across kills: reconnects with Last-Event-ID, records every event."""

    def __init__(self, target: Target, rng: random.Random) -> None:
        self.target = target
        self.rng = rng
        self.last_id: str | None = None
        self.ready: list[str] = []  # ids of ready events (only the first stream's)
        self.events: list[tuple[str, str, dict]] = []  # (id, name, data) of every change
        self.answers: list[int] = []  # the status of every stream opened
        self.resumes = 0  # streams opened with a Last-Event-ID
        self.own_drops = 0  # streams the watcher itself closed...
        self.mid_revision_drops = 0  # ...of which between two events of one revision
        self.connected_to: int | None = None  # the port of the stream it reads now
        self.stop = threading.Event()

    def take(self, item: tuple[str, ...]) -> bool:
        """Record an event; return True for a heartbeat."""
        if item[0] == "comment":
            return item[1] == HEARTBEAT_LINE
        _, event_id, name, data = item
        if name == "ready":
            self.ready.append(event_id)
        else:
            self.events.append((event_id, name, json.loads(data)))
        self.last_id = event_id
        return False

    def open(self, port: int) -> EventStream | None:
        """Open a stream after the last id seen; None if the server is down or refuses."""
        try:
            stream = EventStream(port, self.last_id)
        except OSError:
            return None
        try:
            status = stream.head()
        except (OSError, StreamEnded):
            stream.close()
            return None
        self.answers.append(status)
        if self.last_id is not None:
            self.resumes += 1
        if status != 200:
            stream.close()
            return None
        return stream

    def run(self) -> None:
        """Follow the stream until stop is set."""
        while not self.stop.is_set():
            port = self.target.port
            stream = self.open(port)
            if stream is None:
                time.sleep(0.02)
                continue
            self.connected_to = port
            try:
                self._follow(stream)
            except (OSError, StreamEnded):
                pass  # killed: resume on the next server
            finally:
                self.connected_to = None
                stream.close()

    def _follow(self, stream: EventStream) -> None:
        """Read until stop, or until dropping the stream by choice after some events.

        Every other drop waits for a moment between two events of one
        revision, so that the resume names a position inside it.
        """
        countdown = self.rng.randrange(20, 400)
        mid_revision = self.own_drops % 2 == 0
        while not self.stop.is_set():
            items = stream.items()
            for index, item in enumerate(items):
                self.take(item)
                if item[0] != "event" or item[2] == "ready":
                    continue
                countdown -= 1
                if countdown > 0:
                    continue
                if mid_revision:
                    later = [later[1] for later in items[index + 1 :] if later[0] == "event"]
                    if not later or position_of(later[0])[0] != position_of(item[1])[0]:
                        continue
                    self.mid_revision_drops += 1
                self.own_drops += 1
                return  # what came after this event is dropped unseen

    def catch_up(self, port: int) -> None:
        """Resume once more, with no write under way; read until the first heartbeat.

        The stream sends a heartbeat only once it has sent every change up
        to the store's revision and then sat idle for a heartbeat's time.
        """
        stream = self.open(port)
        assert stream is not None, f"the final resume was refused: {self.answers[-1:]}"
        deadline = time.monotonic() + DEADLINE_S
        try:
            while True:
                assert time.monotonic() < deadline, f"no heartbeat; the last id: {self.last_id}"
                heartbeat = False
                for item in stream.items():
                    heartbeat = self.take(item) or heartbeat
                if heartbeat:
                    return
        finally:
            stream.close()


# -- the test ----------------------------------------------------------------------


def wait_for(condition: Callable[[], bool], what: str, errors: list[BaseException]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert not errors, f"a client thread failed: {errors[0]!r}"
        assert time.monotonic() < deadline, f"waited {DEADLINE_S:.0f} s for {what}"
        time.sleep(0.01)


def value_of(data: dict) -> bytes:
    if "value" in data:
        return data["value"].encode()
    return base64.b64decode(data["value_base64"])


def test_watcher_resuming_across_kill_9_sees_every_acknowledged_write_once(server_factory, summary):
    rng = random.Random(SEED)
    ledger = Ledger()
    server = server_factory(env=ENV, kind=KvappServer)
    target = Target(server.port)
    watcher = Watcher(target, random.Random(rng.random()))
    errors: list[BaseException] = []
    watching = threading.Thread(target=recording_errors, args=(errors, watcher.run), name="watcher")
    watching.start()
    wait_for(lambda: watcher.ready, "the first stream's ready event", errors)
    stop = threading.Event()
    writers = [
        threading.Thread(
            target=recording_errors,
            args=(errors, functools.partial(writer_loop, n, target, ledger, stop)),
            name=f"writer{n}",
        )
        for n in range(WRITERS)
    ]
    for writer in writers:
        writer.start()
    try:
        for round_no in range(ROUNDS + 1):
            # Each server, the restarted ones too, takes writes and serves the watcher...
            wanted = len(ledger.acknowledged) + 5
            wait_for(lambda w=wanted: len(ledger.acknowledged) >= w, "acknowledged writes", errors)
            wait_for(lambda: watcher.connected_to == target.port, "the watcher to resume", errors)
            time.sleep(rng.uniform(0.2, 1.0))
            if round_no == ROUNDS:
                break
            # ...until a SIGKILL at a random moment: mid-commit, mid-answer, mid-event.
            server.kill()
            assert server.proc.returncode == -9
            server = server_factory(env=ENV, kind=KvappServer)  # the same file
            target.port = server.port
        # At least one resume named a position inside a revision.
        wait_for(lambda: watcher.mid_revision_drops, "a drop inside a revision", errors)
    finally:
        stop.set()
        for writer in writers:
            writer.join(timeout=DEADLINE_S)
        watcher.stop.set()
        watching.join(timeout=DEADLINE_S)
    assert not any(thread.is_alive() for thread in [*writers, watching])
    assert not errors, f"a client thread failed: {errors[0]!r}"

    client = http.client.HTTPConnection("127.0.0.1", server.port, timeout=DEADLINE_S)
    client.request("GET", "/kv/?limit=1")
    response = client.getresponse()
    response.read()
    final_revision = int(response.getheader("X-Kvapp-Revision"))
    watcher.catch_up(server.port)

    # One ready event, on the first stream only; every stream opened with 200.
    assert watcher.ready == ["0"]
    assert set(watcher.answers) == {200}, watcher.answers
    assert watcher.resumes >= ROUNDS
    # Strictly increasing positions: no duplicate and no disorder across reconnects.
    positions = [position_of(event_id) for event_id, _, _ in watcher.events]
    assert positions == sorted(set(positions)), "events repeated or out of order"
    seen: dict[str, list[tuple[tuple[int, int], bytes]]] = {}
    for event_id, name, data in watcher.events:
        assert name == "put", (event_id, name, data)
        assert data["revision"] == position_of(event_id)[0], (event_id, data)
        seen.setdefault(data["key"], []).append((position_of(event_id), value_of(data)))
    written = {key for write in ledger.writes for key, _ in write.pairs}
    strangers = set(seen) - written
    assert not strangers, f"events of writes never sent: {strangers}"
    repeated = {key: found for key, found in seen.items() if len(found) > 1}
    assert not repeated, f"keys seen more than once: {repeated}"

    missing, refused_seen, broken, revisions = [], [], [], {}
    for write in ledger.writes:
        name = write.pairs[0][0]
        found = [seen[key][0] for key, _ in write.pairs if key in seen]
        if not found:
            if write.number in ledger.acknowledged:
                missing.append(name)
            continue
        if write.number in ledger.refused:
            refused_seen.append(name)
        # A write is one revision: all its pairs, numbered from 0 in its order, its values.
        revision = found[0][0][0]
        positions_found = [position for position, _ in found]
        if positions_found != [(revision, n) for n in range(len(write.pairs))]:
            broken.append(f"{name}: {len(write.pairs)} pairs, events {positions_found}")
        assert [value for _, value in found] == [v for k, v in write.pairs if k in seen], name
        assert revisions.setdefault(revision, write.number) == write.number, revision
        if write.is_put:
            assert ledger.acknowledged.get(write.number, revision) == revision, (name, revision)
    assert not broken, f"writes seen in part or misnumbered: {broken}"
    assert not missing, f"acknowledged writes missing from the stream: {missing}"
    assert not refused_seen, f"refused writes in the stream: {refused_seen}"
    # Caught up: the last event is of the store's revision, taken once the writers stopped.
    assert positions[-1][0] == final_revision, (positions[-1], final_revision)

    # The store serves what replaying the stream gives: the keys, and their values.
    replayed = {key: value for key, ((_, value),) in seen.items()}
    for key in sorted(written):
        client.request("GET", f"/kv/{quote(key)}")
        response = client.getresponse()
        body = response.read()
        if key in replayed:
            assert (response.status, body) == (200, replayed[key]), key
        else:
            assert response.status == 404, (key, response.status)
    client.close()

    unknown = ledger.unknown
    summary(
        f"[watch-crash] {ROUNDS} kills (seed {SEED}), {WRITERS} writers:"
        f" {len(ledger.writes)} writes sent, {len(ledger.acknowledged)} acknowledged,"
        f" {len(ledger.refused)} refused, {len(unknown)} cut off"
        f" ({len(unknown & set(revisions.values()))} of them committed);"
        f" watcher: {len(watcher.events)} events over {len(watcher.answers)} streams,"
        f" {watcher.resumes} resumes ({watcher.own_drops} by its own choice,"
        f" {watcher.mid_revision_drops} inside a revision), final revision {final_revision}"
    )
