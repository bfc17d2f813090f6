"""Watching: the change stream (GET /kv/?watch) and the long-poll of one key (Prefer: wait).

The stream is Server-Sent Events (https://html.spec.whatwg.org/multipage/
server-sent-events.html): one event per change, in (revision, n) order,
each with id "<revision>-<n>".  A client resumes after the last id it saw
(Last-Event-ID, which EventSource sends by itself, or ?since=), and sees
every later change exactly once.  A stream behind reads the change log
(Store.history) from its position; once caught up it takes the newest
changes from the process's tail (kvapp.web.tail), a cache of the log that
one thread fills, and waits for the tail to move.  No change is queued per
watcher, and a writer never waits for one.

Each watcher holds a server thread while it waits, so a process serves at
most Settings.watcher_limit of them at once (503 beyond).  A stream ends
when its client disconnects (noticed within one heartbeat), when the
server shuts down (App.end_streams), when the change log was trimmed past
its position, or when the database fails; the client then reconnects with
its Last-Event-ID.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from json.encoder import encode_basestring

from kvapp.config import Settings
from kvapp.store.base import (
    EXPIRED,
    PUT,
    WHOLE,
    Condition,
    Event,
    Item,
    StorageError,
    Store,
    show,
)
from kvapp.web.decoding import key_param, named_params, utf8
from kvapp.web.etags import condition
from kvapp.web.request import Request, header_text
from kvapp.web.responses import BadRequest, Ending, Gone, Response, ServiceUnavailable
from kvapp.web.tail import PAGE, Tail

log = logging.getLogger("kvapp.watch")

EVENT_STREAM = "text/event-stream"
# The largest revision a position may name: SQLite's and PostgreSQL's 64-bit integers.
MAX_REVISION = 2**63 - 1
FLAG = b"watch"
# The least time between two sends of a busy stream (one whose sends carry
# more than one change): with 50 watchers of a busy store, one send per commit
# each cost more CPU than the writes.  Durable SETs with 50 busy streams open,
# against none, alternating five runs each: 0.91 at 0.1 s, 0.94 at 0.2 s
# (docs/performance.md).  A change after a quiet spell goes out at once.
GATHER_SECONDS = 0.2

# One element of a Prefer list (RFC 7240 section 2): token [= word] *(; parameter),
# word = token / quoted-string, with the OWS and the comma after it; empty
# elements are allowed (RFC 9110 section 5.6.1).  Read element by element,
# so that a comma inside a quoted string is not taken for the list's.
# Possessive, as etags._ELEMENT is, so that no input can make it backtrack.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]++"
_WORD = rf'(?:{_TOKEN}|"(?:[^"\\]|\\.)*+")'
_PREFERENCE = re.compile(
    rf"[ \t]*+(?:({_TOKEN})(?:[ \t]*+=[ \t]*+({_WORD}))?+"
    rf"(?:[ \t]*+;(?:[ \t]*+{_TOKEN}(?:[ \t]*+=[ \t]*+{_WORD})?+)?+)*+)?+[ \t]*+(,|\Z)"
)

# kvapp.server.Channel.when_closed: register a hook for the connection's close, or None.
WhenClosed = Callable[[Callable[[], None] | None], None]


def split_watch(query: bytes) -> tuple[bool, bytes]:
    """Return whether the query holds the bare flag `watch`, and the query without it.

    `?watch` is a flag, not a key=value pair; `watch=` counts as the flag
    too, any other value is refused.
    """
    found = False
    rest = []
    for segment in query.split(b"&"):
        if segment in (FLAG, FLAG + b"="):
            if found:
                raise BadRequest("give the watch parameter at most once")
            found = True
        elif segment.startswith(FLAG + b"="):
            raise BadRequest("watch takes no value: write ?watch")
        else:
            rest.append(segment)
    return found, b"&".join(rest)


def parse_position(text: str, what: str) -> tuple[int, int]:
    """Return the position after which a stream resumes: "42" (all of 42) or "42-0"."""
    revision, dash, n = text.partition("-")
    parts = (revision, n) if dash else (revision,)
    for part in parts:
        # No int() before the length is known: past 4,300 digits int() raises.
        if not (part.isascii() and part.isdigit() and (part == "0" or part[0] != "0")):
            raise BadRequest(
                f"{what} must be a revision such as 42, or an event id such as 42-0,"
                f" not {show(text)}"
            )
    if any(len(part) > len(str(MAX_REVISION)) for part in parts) or (
        int(revision) > MAX_REVISION or (dash and int(n) >= WHOLE)
    ):
        raise BadRequest(f"{what} {show(text)} is out of range")
    return int(revision), int(n) if dash else WHOLE


def trimmed(position: tuple[int, int], floor: int) -> bool:
    """Return True if changes after position may be gone: it is within the history floor.

    The floor is the last revision removed whole, so (floor, n) is gone too.
    """
    return position < (floor, WHOLE)


def close_hook(client_gone: Callable[[], bool]) -> WhenClosed | None:
    """Return the request's hook for the close of its connection, or None (another server).

    Under kvapp's waitress channel (kvapp.server.Channel, whose method
    client_gone is) a stream or long-poll asleep waiting for a change is
    woken when its client goes, not only at its next heartbeat.
    """
    return getattr(getattr(client_gone, "__self__", None), "when_closed", None)


def event_bytes(event: Event) -> bytes:
    """Return one change as a Server-Sent Event: id, event and one data line of JSON.

    The JSON is what json.dumps(ensure_ascii=False) gives for the dict of
    the fields, written out directly: each process encodes every change,
    and building and encoding a dict per change was a measurable share of
    a busy worker's time (py-spy, docs/performance.md).
    """
    key = _string(event.key)
    if event.kind == PUT:
        value = event.value or b""
        try:
            shown = f'"value": {_string(value.decode("utf-8"))}'
        except UnicodeDecodeError:
            shown = f'"value_base64": "{base64.b64encode(value).decode("ascii")}"'
        expires_at = "null" if event.expires_at is None else str(event.expires_at)
        line = (
            f'{{"key": {key}, "revision": {event.revision}, {shown},'
            f' "content_type": {_string(event.content_type or "")}, "expires_at": {expires_at}}}'
        )
        name = "put"
    else:
        expired = "true" if event.kind == EXPIRED else "false"
        line = f'{{"key": {key}, "revision": {event.revision}, "expired": {expired}}}'
        name = "delete"
    return f"id: {event.revision}-{event.n}\nevent: {name}\ndata: {line}\n\n".encode()


def _string(text: str) -> str:
    """Return text as a JSON string on one line.

    An SSE field ends at CR or LF, which encode_basestring escapes (as
    json.dumps does).  It leaves NEL, LINE SEPARATOR and PARAGRAPH
    SEPARATOR as they are, and some line splitters (Python's str.splitlines)
    break on them: those are escaped too.  Everything else non-ASCII stays
    readable UTF-8.
    """
    encoded = str(encode_basestring(text))
    # Those three are not ASCII, so an ASCII text (most keys and values)
    # skips translate: encoding a change took 2.4 µs with it, 1.0-1.9 without (timeit).
    return encoded if text.isascii() else encoded.translate(_LINE_BREAKS)


HEARTBEAT = b": keep-alive\n\n"
_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


class Watching:
    """The watch routes of one process: its watcher slots, its heartbeat, its shutdown."""

    def __init__(self, repository: Store, settings: Settings) -> None:
        self.repository = repository
        self.max_key_bytes = settings.max_key_bytes
        self.limit = settings.watcher_limit
        self.automatic = settings.max_watchers is None
        self.heartbeat = settings.watch_heartbeat_seconds
        self.max_wait = settings.max_wait_seconds
        self.active = 0
        self._lock = threading.Lock()
        self.closing = threading.Event()
        # One per open stream: set when its client goes, or at shutdown.
        self._ended: set[threading.Event] = set()
        self.tail = Tail(repository, event_bytes)

    # -- slots and shutdown --------------------------------------------------

    def _take_slot(self) -> None:
        with self._lock:
            if self.active >= self.limit:
                raise ServiceUnavailable(
                    f"this server process already serves {self.limit} watchers (max_watchers):"
                    " raise max_watchers, with threads to match, or add workers",
                    retry_after=5,
                )
            self.active += 1

    def _free_slot(self) -> None:
        with self._lock:
            self.active -= 1

    def _end_stream(self, when_closed: WhenClosed | None, ended: threading.Event) -> None:
        if when_closed is not None:
            when_closed(None)
        with self._lock:
            self._ended.discard(ended)
        self.tail.detach()
        self._free_slot()

    def fit_threads(self, threads: int) -> None:
        """Make an automatic limit half of the server's threads (Settings.watcher_limit)."""
        if self.automatic:
            self.limit = threads // 2

    def end_streams(self) -> None:
        """End every stream and long-poll of this process (shutdown); refuse new ones."""
        self.closing.set()
        with self._lock:
            for ended in self._ended:
                ended.set()
        self.repository.feed.notify()
        self.tail.wake()

    # -- the stream ----------------------------------------------------------

    def stream(self, request: Request, query: bytes) -> Response:
        """GET /kv/?watch[&prefix=p][&since=R]: Server-Sent Events, one per change."""
        params = named_params(query, ("prefix", "since"))
        since = params.get("since")
        key_prefix = utf8(params.get("prefix", b""), "prefix")
        if key_prefix:
            key_param(key_prefix, "prefix", self.max_key_bytes)
        # EventSource sends Last-Event-ID when it reconnects to the same URL,
        # since= included: Last-Event-ID is where the client got to, so it wins.
        last_id = request.header("HTTP_LAST_EVENT_ID").strip(" \t")
        position = None if since is None else parse_position(utf8(since, "since"), "since")
        if last_id:
            position = parse_position(header_text(last_id), "Last-Event-ID")
        start = self.repository.history(position or (0, 0), key_prefix, 0)
        if position is not None:
            self._check_resumable(position, start.revision, start.floor)
        self._take_slot()
        # Something at once, so that the status and headers go out now.
        first = f": resuming after {last_id or utf8(since or b'', 'since')}\n\n".encode()
        if position is None:
            position = (start.revision, WHOLE)
            ready = json.dumps({"revision": start.revision})
            first = f"id: {start.revision}\nevent: ready\ndata: {ready}\n\n".encode()
        client_gone = request.environ.get("waitress.client_disconnected") or (lambda: False)
        when_closed = close_hook(client_gone)
        ended = threading.Event()
        with self._lock:
            self._ended.add(ended)
            if self.closing.is_set():
                ended.set()
        self.tail.attach()
        if when_closed is not None:
            when_closed(partial(self._client_went, key_prefix, ended))
        events = self._events(position, key_prefix, first, client_gone, ended)
        ending = Ending(events, lambda sent: self._end_stream(when_closed, ended))
        headers = [("Cache-Control", "no-store"), ("X-Accel-Buffering", "no")]
        return Response(200, b"", EVENT_STREAM, headers, stream=ending)

    def _client_went(self, prefix: str, ended: threading.Event) -> None:
        """Wake the stream that may be asleep for this client (the main loop's thread)."""
        ended.set()  # busy: letting changes gather
        self.tail.nudge(prefix)  # caught up: asleep in the tail
        self.repository.feed.notify()  # reading the change log: asleep on the feed

    def _check_resumable(self, position: tuple[int, int], revision: int, floor: int) -> None:
        remedy = (
            "list the keys again (GET /kv/?prefix=...), then watch with since= the"
            " X-Kvapp-Revision of that listing"
        )
        if trimmed(position, floor):
            raise Gone(
                f"changes up to revision {floor} are no longer kept (watch_history_seconds,"
                f" watch_history_max); the oldest revision to resume from is {floor}: {remedy}"
            )
        if position[0] > revision:
            raise Gone(
                f"revision {position[0]} is ahead of this store's revision {revision}"
                f" (another store, or one restored from a backup): {remedy}"
            )

    def _events(
        self,
        position: tuple[int, int],
        prefix: str,
        first: bytes,
        client_gone: Callable[[], bool],
        ended: threading.Event,
    ) -> Iterator[bytes]:
        """Yield first, then every change after position as it comes, and heartbeats.

        ended is set when the client goes (under kvapp's waitress channel) or
        the server stops: a stream letting changes gather wakes at once, and
        frees its slot for the client's reconnection.
        """
        feed, tail = self.repository.feed, self.tail
        yield first
        beat = time.monotonic()
        # Asked at every turn, not only when idle: under waitress the first
        # call also makes the loop watch the connection for its end.
        while not self.closing.is_set() and not client_gone():
            feed_version = feed.version
            try:
                in_tail = tail.read(position, prefix)
                if in_tail is not None:
                    (chunks, count, position), more = in_tail, False
                else:  # behind the tail, or no tail yet: the change log itself
                    from_log = self._from_log(position, prefix)
                    if from_log is None:
                        return  # trimmed past it: the client's reconnect gets the 410
                    chunks, position, more = from_log
                    count = len(chunks)
            except StorageError as exc:
                log.warning("a watch stream ended: %s", exc)
                return
            if chunks:
                yield b"".join(chunks)
                beat = time.monotonic()
                if count > 1 and not more:
                    # Changes come faster than one per send: let the next ones
                    # gather, so that a busy stream sends once per GATHER_SECONDS
                    # rather than once per commit.  A change after a quiet spell goes out at once.
                    ended.wait(GATHER_SECONDS)
                continue
            if more:
                continue
            # Caught up: wait for a change under prefix in the tail, or for
            # any commit if it read the log; a heartbeat when idle that long.
            while not self.closing.is_set():
                if client_gone():
                    return
                idle = time.monotonic() - beat
                if idle >= self.heartbeat:
                    yield HEARTBEAT
                    beat = time.monotonic()
                elif in_tail is not None:
                    if tail.wait(position, prefix, self.heartbeat - idle):
                        break
                elif feed.wait(feed_version, self.heartbeat - idle) != feed_version:
                    break

    def _from_log(
        self, position: tuple[int, int], prefix: str
    ) -> tuple[list[bytes], tuple[int, int], bool] | None:
        """Return a page of the change log after position: events, its end, whether more follow.

        None when the log no longer reaches back to position.
        """
        history = self.repository.history(position, prefix, PAGE)
        if trimmed(position, history.floor):
            return None
        chunks = [event_bytes(event) for event in history.events]
        if history.cut:
            last = history.events[-1]
            return chunks, (last.revision, last.n), True
        return chunks, max(position, (history.revision, WHOLE)), False

    # -- the long-poll -------------------------------------------------------

    def wait_seconds(self, request: Request) -> int | None:
        """Return the wait a Prefer header asks for (RFC 7240 section 4.3), capped; None if none.

        As RFC 7240 asks, a preference given twice counts once (the first),
        and a malformed wait is ignored rather than refused.
        """
        prefer = request.header("HTTP_PREFER")
        if not prefer:
            return None
        wait: str | None = None
        position = 0
        while True:  # each element ends in a comma, which moves on, or at the end
            element = _PREFERENCE.match(prefer, position)
            if element is None:
                return None  # a malformed header: none of its preferences is certain
            name, value, comma = element.groups()
            position = element.end()
            if wait is None and name is not None and name.lower() == "wait":
                wait = value or ""
            if not comma:
                break
        if wait is not None and wait.startswith('"'):
            wait = re.sub(r"\\(.)", r"\1", wait[1:-1])
        if not (wait and wait.isascii() and wait.isdigit()):
            return None
        # No int() of thousands of digits; any number past the cap is the cap.
        digits = wait.lstrip("0") or "0"
        return self.max_wait if len(digits) > 10 else min(int(digits), self.max_wait)

    def long_poll(
        self, request: Request, item: Item | None, read: Callable[[], Item | None]
    ) -> tuple[Item | None, list[tuple[str, str]]]:
        """Return the key's item once a long-poll is over, and the headers it adds to the answer.

        item: the key's item as just read; read() reads it again.  A long-poll
        is a GET with If-None-Match and Prefer: wait=N: while If-None-Match
        names the current version, it waits up to N seconds for a change.
        Any other request gets item back at once, and no header.
        """
        tags = condition(request.environ)
        wait = self.wait_seconds(request)
        if wait is None or tags is None or tags.if_none_match is None:
            return item, []
        unchanged = Condition(if_none_match=tags.if_none_match)
        if wait and item is not None and not unchanged.holds(item.revision):

            def changed() -> bool:
                nonlocal item
                item = read()
                return item is None or unchanged.holds(item.revision)

            client_gone = request.environ.get("waitress.client_disconnected")
            self.hold(wait, changed, client_gone or (lambda: False))
        return item, [("Preference-Applied", f"wait={wait}")]

    def hold(self, wait: int, changed: Callable[[], bool], client_gone: Callable[[], bool]) -> None:
        """Return once changed() is True, wait seconds have passed, or the server shuts down.

        changed() reads the store; it is asked again after every commit the
        feed reports.
        """
        feed = self.repository.feed
        when_closed = close_hook(client_gone)
        self._take_slot()
        if when_closed is not None:
            when_closed(feed.notify)  # wakes every long-poll: each asks client_gone()
        try:
            deadline = time.monotonic() + wait
            while True:
                # The version before the looks at closing and at the client:
                # end_streams() and a closed connection set theirs, then move
                # the feed, so one that comes after these looks ends the wait.
                version = feed.version
                if self.closing.is_set() or client_gone() or changed():
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                feed.wait(version, min(remaining, self.heartbeat))
        finally:
            if when_closed is not None:
                when_closed(None)
            self._free_slot()
