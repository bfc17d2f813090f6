"""The watchers' side of `GET /kv/?watch`: streams read as they arrive, by one thread.

The answer is chunked HTTP/1.1 carrying Server-Sent Events
(https://html.spec.whatwg.org/multipage/server-sent-events.html).  The
thread that reads the sockets only dechunks and counts events, and keeps
what came with the time of each read; the events are parsed afterwards.
"""

from __future__ import annotations

import json
import selectors
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

WAIT = 30.0  # s to open the streams, and for awaited events to arrive


class Dechunk:
    """The body of a chunked HTTP/1.1 answer, fed as it arrives (RFC 9112 section 7.1)."""

    def __init__(self) -> None:
        self.buffer = b""
        self.left = 0  # bytes of the current chunk's data still to come
        self.crlf = False  # the CRLF after a chunk's data is still to come
        self.ended = False  # the last (empty) chunk has come

    def feed(self, data: bytes) -> bytes:
        """Return the body bytes in data (and in what came before it, incomplete)."""
        buffer = self.buffer + data
        at = 0  # the buffer is cut once, at the end: a read may hold many chunks
        out = []
        while not self.ended:
            if self.left:
                piece = buffer[at : at + self.left]
                out.append(piece)
                at += len(piece)
                self.left -= len(piece)
                if self.left:
                    break
                self.crlf = True
            if self.crlf:
                if len(buffer) - at < 2:
                    break
                at, self.crlf = at + 2, False
            end = buffer.find(b"\r\n", at)
            if end < 0:
                break
            self.left = int(buffer[at:end].split(b";")[0], 16)
            at = end + 2
            self.ended = self.left == 0
        self.buffer = buffer[at:]
        return b"".join(out)


def sse_events(text: bytes) -> tuple[list[dict[str, str]], bytes]:
    """Return the complete events in text (their fields: id, event, data), and the rest.

    Comments (heartbeats) are left out; data lines of one event are joined
    with newlines, as EventSource does.
    """
    *blocks, rest = text.split(b"\n\n")
    events = []
    for block in blocks:
        fields: dict[str, str] = {}
        for line in block.decode("utf-8").split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data" and "data" in fields:
                value = fields["data"] + "\n" + value
            fields[name] = value
        if fields:
            events.append(fields)
    return events, rest


PUT_MARK, READY_MARK = b"\nevent: put\n", b"\nevent: ready\n"


@dataclass
class Stream:
    """One watcher's stream: how many put events have come, and what came when.

    The reader thread only dechunks and counts (in C, bytes.count), so that
    it holds the GIL for microseconds per read: the writer's thread, in the
    same process, takes its ack times without waiting for it.  The events are
    parsed after the cell (arrivals).
    """

    record: bool = True  # keep what came with its time, for arrivals(); else only count
    body: Dechunk = field(default_factory=Dechunk)
    rest: bytes = b""
    puts: int = 0
    ready: bool = False
    last_put: float = 0.0  # when the latest put event came
    pieces: list[tuple[float, bytes]] = field(default_factory=list)

    def feed(self, data: bytes, when: float) -> None:
        """Take data of the answer, past its head, that arrived at time when."""
        body = self.body.feed(data)
        if self.record:
            self.pieces.append((when, body))
        text = self.rest + body
        cut = text.rfind(b"\n\n")
        if cut < 0:
            self.rest = text
            return
        complete, self.rest = text[: cut + 2], text[cut + 2 :]
        puts = complete.count(PUT_MARK)
        if puts:
            self.puts += puts
            self.last_put = when
        self.ready = self.ready or READY_MARK in complete

    def arrivals(self) -> dict[str, float]:
        """Return when each key's first put event came: the time of the read that completed it."""
        found: dict[str, float] = {}
        rest = b""
        for when, body in self.pieces:
            events, rest = sse_events(rest + body)
            for event in events:
                if event.get("event") == "put":
                    found.setdefault(json.loads(event["data"])["key"], when)
        return found


class Watchers:
    """n streams of GET /kv/?watch&prefix=..., all read by one thread as long as they are open."""

    def __init__(self, url: str, count: int, prefix: str, record: bool) -> None:
        host, _, port = url.removeprefix("http://").partition(":")
        self.address = (host, int(port))
        self.target = f"/kv/?watch&prefix={urllib.parse.quote(prefix, safe='')}"
        self.refused = 0  # 503s while opening: a worker already served its max_watchers
        self.streams: list[Stream] = []
        self._sockets: list[socket.socket] = []
        self._stop = threading.Event()
        self.reader_cpu = 0.0
        try:
            deadline = time.monotonic() + WAIT
            while len(self._sockets) < count:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {len(self._sockets)} of {count} watch streams opened")
                self._open(record)
            self._thread = threading.Thread(target=self._read, name="bench-watchers", daemon=True)
            self._thread.start()
            self.wait(lambda stream: stream.ready, "every stream's ready event")
        except BaseException:
            self.close()
            raise

    def _open(self, record: bool) -> None:
        sock = socket.create_connection(self.address, timeout=WAIT)
        host = f"{self.address[0]}:{self.address[1]}"
        sock.sendall(f"GET {self.target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        when = time.perf_counter()
        head, _, body = data.partition(b"\r\n\r\n")
        status = head.split(b" ", 2)[1] if head.startswith(b"HTTP/1.1 ") else b"?"
        if status == b"503":
            sock.close()
            self.refused += 1
            time.sleep(0.01)
            return
        if status != b"200":
            sock.close()
            raise RuntimeError(f"GET {self.target} answered {head[:200]!r}")
        stream = Stream(record)
        stream.feed(body, when)
        sock.setblocking(False)
        self._sockets.append(sock)
        self.streams.append(stream)

    def _read(self) -> None:
        started = time.thread_time()
        with selectors.DefaultSelector() as selector:
            for sock, stream in zip(self._sockets, self.streams, strict=True):
                selector.register(sock, selectors.EVENT_READ, (sock, stream))
            while not self._stop.is_set():
                for key, _ in selector.select(0.1):
                    sock, stream = key.data
                    try:
                        data = sock.recv(262144)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    when = time.perf_counter()
                    if not data:
                        selector.unregister(sock)
                        continue
                    stream.feed(data, when)
        self.reader_cpu = time.thread_time() - started

    def wait(self, done: Callable[[Stream], bool], what: str, timeout: float = WAIT) -> bool:
        """Return True once done(stream) holds for every stream; False after timeout s."""
        deadline = time.monotonic() + timeout
        while not all(done(stream) for stream in self.streams):
            if time.monotonic() > deadline:
                print(f"  watchers: gave up waiting for {what}", file=sys.stderr, flush=True)
                return False
            time.sleep(0.01)
        return True

    def close(self) -> None:
        self._stop.set()
        thread = getattr(self, "_thread", None)
        if thread is not None:
            thread.join(timeout=WAIT)
        for sock in self._sockets:
            sock.close()

    def __enter__(self) -> Watchers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def received(stream: Stream, count: int) -> bool:
    """Return True once stream has received count put events."""
    return stream.puts >= count
