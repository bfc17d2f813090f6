"""How kvapp runs waitress: one process's server on a listening socket, its channel, its loop.

waitress 3.0.2's main loop (wasyncore.poll2) asks every channel, on every
pass, whether it is readable and writable.  HTTPChannel.writable() is true
whenever its output buffer holds bytes, also while a task thread is writing
an answer into it: write_soon() appends, then sends at once under
outbuf_lock (send_bytes = 1).  In that window poll() returns at once (the
socket can take bytes), handle_write() finds outbuf_lock taken and sends
nothing, and the loop goes round again, holding the GIL, until the task
thread gets the GIL back: up to sys.getswitchinterval() (5 ms) per answer.
Measured on the 2-core machine (durable SET, wrk, 16 threads): 95 to 227
passes of the loop per request and 2.8 to 11.7 ms of CPU per request, for
396, 110 and 88 req/s at 16, 64 and 256 connections; with Channel below,
0.5 to 0.7 passes, 0.3 to 0.5 ms, and 3,067, 2,709 and 2,008 req/s
(docs/performance.md).

Task and Channel.write_parts also send an answer's head with its first
body bytes in one sendmsg(2), and a stream's chunks without copying them:
waitress sends the head alone, copies each chunk twice to frame it, and
once into and once out of the channel's buffer, which keeps every byte it
ever sent (up to 16 MiB) while its connection lives.  With 50 watch
streams of a busy store that was 339 MiB resident after 15 s.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import resource
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable
from typing import Any

from waitress.buffers import OverflowableBuffer
from waitress.channel import ClientDisconnected, HTTPChannel
from waitress.server import BaseWSGIServer, create_server
from waitress.task import WSGITask

from kvapp.mainloop import MainLoop, Stopping
from kvapp.refusals import ErrorTask, Parser

# While a task thread writes, it sends its own output; the main loop helps
# then only once this much is waiting (a client that reads slowly, a large
# value), well below waitress's outbuf_high_watermark (16 MiB), where the
# task thread stops and waits for the main loop to send.
LOOP_FLUSH_BYTES = 1024 * 1024


class Task(WSGITask):
    """waitress's WSGITask, whose writes go out in one piece each (Channel.write_parts)."""

    # waitress sets these in __init__, unannotated.
    wrote_header: bool
    content_bytes_written: int

    def write(self, data: bytes) -> None:
        """Send the head (once) and data as WSGITask.write does, in one call and without copies."""
        if not self.complete:
            raise RuntimeError("start_response was not called before body written")
        parts = []
        if not self.wrote_header:
            parts.append(self.build_response_header())
            self.wrote_header = True
        rest = b""  # what waitress's own write still has to judge
        if data and self.has_body:
            length, written = self.content_length, self.content_bytes_written
            if self.chunked_response:
                parts += (b"%X\r\n" % len(data), data, b"\r\n")  # RFC 9112 section 7.1
            elif length is None:
                parts.append(data)  # the connection's close ends the body
            elif written + len(data) <= length:
                parts.append(data)
                self.content_bytes_written = written + len(data)
            else:
                rest = data  # past Content-Length: waitress cuts and logs it
        elif data:
            rest = data  # a body where none may be: waitress counts and logs it
        self.channel.write_parts(parts)
        if rest:
            super().write(rest)


class Channel(HTTPChannel):
    """waitress's HTTPChannel, without the busy loop while a task writes its answer.

    It also notices a client that goes away while a long request (a watch
    stream, a long-poll) runs: see check_client_disconnected.
    """

    task_class = Task
    error_task_class = ErrorTask
    parser_class = Parser
    outbufs: list[OverflowableBuffer]  # waitress sets it in __init__, unannotated
    _watching = False
    _closed_hook: Callable[[], None] | None = None
    # kvapp.server._client_stalled's last sight of the client taking bytes.
    taken_mark: tuple[int, float, float] | None = None
    task_writing = False  # a task thread is inside write_parts or write_soon

    def send_continue(self) -> None:
        """Send 100 Continue, unless the request is already refused from its headers.

        waitress sends it also when its parser refused the request (a
        Content-Length over max_request_body_size), and then reopens the
        request to read a body it will not take: the client waits for a
        status after sending up to max_request_body_size, or for a body that
        never comes.  RFC 9110 section 10.1.1: a server that can tell the
        final status from the header fields may send it at once.  Left
        complete, the request goes to the ErrorTask, which answers and closes.
        """
        if self.request is not None and self.request.error is not None:
            return
        super().send_continue()

    def write_parts(self, parts: list[bytes]) -> None:
        """Send parts now if nothing is waiting to go before them; queue what the socket refuses.

        A task thread's write.  Nothing waits before them in nearly every
        answer: the socket is non-blocking, so sendmsg takes what fits, and
        only the rest is copied into the buffer (waitress's write_soon,
        which also meets again any error here, and closes the channel).
        """
        if not self.connected:
            raise ClientDisconnected
        parts = [part for part in parts if part]
        if not parts:
            return
        self.task_writing = True
        try:
            with self.outbuf_lock:
                # Again under the lock: handle_close clears connected under it,
                # and closes the socket after.
                if not self.connected:
                    raise ClientDisconnected
                sent = 0
                if not self.total_outbufs_len:
                    try:
                        sent = self.socket.sendmsg(parts)
                    except OSError:  # EAGAIN, or the client went: as below
                        sent = 0
                    if sent:
                        self.last_activity = time.time()
                rest = _after(parts, sent)
                if rest:
                    super().write_soon(rest)
        finally:
            self._task_wrote()

    def write_soon(self, data: Any) -> int:
        """waitress's write_soon (its own write path: 100 Continue, odd bodies), flagged."""
        self.task_writing = True
        try:
            return int(super().write_soon(data))
        finally:
            self._task_wrote()

    def _task_wrote(self) -> None:
        """End a task thread's write (see writable): hand what the socket refused to the loop.

        A plain method, not a context manager: write_parts runs once per answer.
        """
        self.task_writing = False
        if self.total_outbufs_len:
            # It waits for the loop, which sends it once the socket takes bytes
            # again (writable), and must ask this channel again.
            self.server.pull_trigger()

    def _flush_some(self, do_close: bool = True) -> bool:
        """Send what waits (waitress), then drop a buffer that is empty but holds memory.

        waitress's buffer of a connection that once sent more than 8 KiB
        at once keeps, in a BytesIO, every byte sent since, until 16 MiB
        (outbuf_high_watermark): here it starts afresh once all is sent.
        """
        flushed = bool(super()._flush_some(do_close))
        if not self.total_outbufs_len and self.outbufs[-1].buf is not None:
            # The main loop may come here without the lock, while a task
            # thread that has just ended sends 100 Continue under it.
            with self.outbuf_lock:
                outbuf = self.outbufs[-1]
                if not self.total_outbufs_len and len(self.outbufs) == 1:
                    self.outbufs = [OverflowableBuffer(self.adj.outbuf_overflow)]
                    self.current_outbuf_count = 0
                    outbuf.close()
        return flushed

    def when_closed(self, hook: Callable[[], None] | None) -> None:
        """Call hook (in the main loop's thread) once the connection closes; None: do not.

        A watch stream asleep until a change under its prefix would
        otherwise learn that its client went away only at its next
        heartbeat, holding its thread and its max_watchers slot till then.
        """
        self._closed_hook = hook
        # After setting the hook: a close in between has cleared connected
        # before handle_close looked for a hook, so one of the two calls it.
        if hook is not None and not self.connected:
            hook()

    def handle_close(self) -> None:
        super().handle_close()
        hook, self._closed_hook = self._closed_hook, None
        if hook is not None:
            hook()

    def check_client_disconnected(self) -> bool:
        """Return True once the client has gone (environ["waitress.client_disconnected"]).

        waitress stops reading a connection while its request runs, so it
        would learn of a close only when a write failed.  A task that asks
        this wants to know sooner: from then until it ends, the loop keeps
        reading the connection (only its one request: a pipelined second one
        stops the reading again), and end of file closes the channel.
        """
        if not self._watching:
            self._watching = True
            self._mark()
            self.server.pull_trigger()
        return not self.connected

    def readable(self) -> bool:
        if self._watching and len(self.requests) == 1:
            return not (self.will_close or self.close_when_flushed)
        return bool(super().readable())

    def writable(self) -> bool:
        """Return True if the main loop should send now: bytes wait, and no task is writing.

        While a task thread writes, it sends its own output (the busy loop
        of the module's docstring otherwise), unless much is waiting.  What
        the socket refused stays in the buffer once the task has written:
        the loop sends it as the client takes bytes.  Before, it waited for
        the task's next write: the end of a watch event for a slow client
        came a heartbeat (15 s) late.
        """
        if self.task_writing and self.total_outbufs_len < LOOP_FLUSH_BYTES:
            return bool(self.will_close or self.close_when_flushed)
        return bool(super().writable())

    # The main loop's hooks (kvapp.mainloop): it asks a channel only after an
    # event or a mark, so it must hear of every change made elsewhere.

    def add_channel(self, map: Any = None) -> None:
        super().add_channel(map)
        loop = getattr(self.server, "main_loop", None)
        if loop is not None:
            loop.added(self._fileno)

    def del_channel(self, map: Any = None) -> None:
        fd = self._fileno
        super().del_channel(map)
        loop = getattr(self.server, "main_loop", None)
        if loop is not None and fd is not None:
            loop.removed(fd)

    def service(self) -> None:
        """Serve one request (a task thread); the loop asks this channel again afterwards.

        While it runs, each pull of the trigger marks this channel first
        (serve() wraps pull_trigger), so the loop that the pull wakes sees
        the changes made before it.  The last mark covers an end without a
        pull (waitress pulls only while the client is connected).
        """
        _serving.channel = self
        try:
            super().service()
        finally:
            _serving.channel = None
            self._watching = False
            self._mark()

    def _mark(self) -> None:
        loop = getattr(self.server, "main_loop", None)
        fd = self._fileno
        if loop is not None and fd is not None:
            loop.mark(fd)


def _after(parts: list[bytes], sent: int) -> bytes:
    """Return the bytes of parts after the first sent ones."""
    rest = []
    for part in parts:
        if sent >= len(part):
            sent -= len(part)
        else:
            rest.append(memoryview(part)[sent:])
            sent = 0
    return b"".join(rest)


# The channel whose request this thread serves (Channel.service), if any.
_serving = threading.local()


def _marking_pull(pull: Callable[[], None]) -> Callable[[], None]:
    """Return pull_trigger that first marks the channel the calling task thread serves."""

    def pull_trigger() -> None:
        channel = getattr(_serving, "channel", None)
        if channel is not None:
            channel._mark()
        pull()

    return pull_trigger


# Files a process keeps open besides its connections and its threads: the
# listening socket, waitress's trigger pipe, the epoll set, the writer's
# database, WAL and -shm, the -gen and metrics files, the log.  An idle
# server held 17, 20 once the metrics file was open.
SPARE_FILES = 64
# Each thread that has served a request keeps its own SQLite reader
# connection: the database and its -wal (-shm is mapped once per process).
# Measured in /proc/PID/fd after every thread had served requests: 23 open
# files at --threads 4, 43 at 16 (15 threads had served), 126 at 64 (55):
# two more per thread each time.  A PostgreSQL reader is one socket.
FILES_PER_THREAD = 2
# After accept() fails with EMFILE or ENFILE the connection stays in the
# listen queue and the listening socket stays readable, so the loop, asking
# again at once, spun at 100% CPU (waitress logged a traceback per attempt:
# 212,430 lines in 5 s).  nginx stops accepting for accept_mutex_delay
# (500 ms) then (ngx_event_accept.c).
ACCEPT_PAUSE_S = 0.5
# How long a stopping server keeps sending what its channels hold (_drain).
# waitress then waits up to 5 s for its threads: within kvapp.workers'
# STOP_GRACE_S (10 s), after which the supervisor kills a worker.
STOP_DRAIN_S = 4.0


def _maintenance(server: Any) -> Any:
    """Return waitress's maintenance, judging a channel with bytes queued by its client's reading.

    waitress's maintenance closes a channel with no request whose last
    send (last_activity) is older than channel_timeout, and throws away
    what waits in its buffers.  A client that reads a large answer slowly
    after its requests have been served (pipelined GETs of 1 MiB values
    read at 200 kB/s, channel_timeout 5 s) saw it cut: the loop sends, and
    so moves last_activity, only when the socket can take bytes again,
    after about a third of the kernel's ~4 MiB send queue has drained.
    Such a channel, like one whose request still runs, is now judged by
    _client_stalled: it stays while its client takes bytes, and is closed
    once its client has taken none for channel_timeout.  A channel with
    nothing queued keeps waitress's idle rule.

    A running request's channel with bytes waiting is judged alike.  A
    watch stream's client that stops reading kept its thread and its
    max_watchers slot for good: its task waits, once 16 MiB are queued,
    for a send that never comes.  As nginx's send_timeout, it is closed,
    which wakes its task, whose next write fails.

    A stalled channel is closed here, not marked: a mark is acted on when
    the socket can take bytes, which this one never does.  This runs in
    the main loop's thread (the listening socket's readable()), the
    thread that closes channels.
    """

    def run(now: float) -> None:
        timeout = server.adj.channel_timeout
        for channel in list(server.active_channels.values()):
            # One with bytes in its buffers is looked at on every pass, so that
            # a client that stops taking them is closed channel_timeout after it
            # last took some, give or take cleanup_interval.  One with none is
            # looked at once its last send is that old (waitress's idle rule):
            # the kernel may still hold megabytes for it.
            buffered = channel.total_outbufs_len
            if not buffered and (channel.requests or channel.last_activity >= now - timeout):
                continue
            if _client_stalled(channel, now, timeout):
                channel.handle_close()
            elif not buffered and (channel.taken_mark is None or not channel.taken_mark[0]):
                # The client has taken every byte: idle, waitress's rule.
                # (Counting from the pass that first saw the kernel's queue
                # empty kept it up to twice channel_timeout.)
                channel.will_close = True

    return run


def _client_stalled(channel: Any, now: float, timeout: float) -> bool:
    """Return True once channel's client has taken no byte for timeout seconds while some wait.

    Its last send (last_activity) alone cannot tell: a client that reads
    slowly drains the kernel's send buffer (up to about 4 MiB) for longer
    than that while nothing more can go in.  The kernel's count of bytes
    sent but not acknowledged, or not sent yet (SIOCOUTQ, tcp(7)), falls
    whenever the client takes some.  What waits in the channel's buffer is
    first offered to the socket, as the loop would once it could write.
    """
    channel._flush_exception(channel._flush_some_if_lockable)
    if channel.will_close:  # the send failed: the connection is gone
        return True
    try:
        queued = struct.unpack("i", fcntl.ioctl(channel.socket, termios.TIOCOUTQ, b"\0" * 4))[0]
    except OSError:
        return False  # not a TCP socket, or already closed: nothing to judge
    # (queued, last_activity, since): since is when the client was last seen
    # taking bytes; with nothing queued before or now, when it took the last.
    mark = channel.taken_mark
    if mark is None or queued < mark[0] or channel.last_activity != mark[1]:
        since = now if queued or (mark is not None and mark[0]) else channel.last_activity
        channel.taken_mark = (queued, channel.last_activity, since)
        return False
    return bool(queued) and now - mark[2] >= timeout


def raise_open_files_limit(connection_limit: int, threads: int = 0) -> str | None:
    """Raise this process's soft RLIMIT_NOFILE to fit connection_limit; return a warning or None.

    Debian's default soft limit is 1024 open files; each connection is
    one, each thread FILES_PER_THREAD.  The soft limit may rise up to the
    hard one without privilege (getrlimit(2)).
    """
    needed = connection_limit + threads * FILES_PER_THREAD + SPARE_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < needed:
        return (
            f"connection_limit = {connection_limit} with {threads} threads needs {needed} open"
            f" files, but the limit is {soft} (ulimit -n); connections beyond it will wait:"
            " lower connection_limit or raise the hard limit (LimitNOFILE= in a systemd unit)"
        )
    return None


class _AcceptPause:
    """A server's accept, paused for ACCEPT_PAUSE_S once the process has no file left for it."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.until = 0.0  # time.monotonic() before which the socket is not asked for
        self.refused = 0  # EMFILE or ENFILE since the last connection accepted
        self._accept, self._readable = server.accept, server.readable
        server.accept, server.readable = self.accept, self.readable

    def stop(self) -> None:
        """Accept no more connections: the server is stopping."""
        self.until = math.inf

    def readable(self) -> bool:
        """waitress's readable() (it runs the maintenance too), False while paused."""
        wanted = bool(self._readable())
        return wanted and time.monotonic() >= self.until

    def accept(self) -> tuple[socket.socket, Any] | None:
        """Return waitress's accept(); None after EMFILE or ENFILE, which pauses accepting."""
        try:
            pair: tuple[socket.socket, Any] | None = self._accept()
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            self.until = time.monotonic() + ACCEPT_PAUSE_S
            if not self.refused:  # one line per shortage, not one per attempt
                self.server.logger.warning(
                    "cannot accept connections: %s; new ones wait in the listen queue"
                    " (the open-files limit is too low for connection_limit and threads)",
                    os.strerror(exc.errno),
                )
            self.refused += 1
            return None
        if pair is not None and self.refused:
            failed = f"{self.refused} failed attempt{'s' * (self.refused > 1)}"
            self.server.logger.warning("accepting connections again after %s", failed)
            self.refused = 0
        return pair


def build(app: Any, sock: socket.socket, options: dict[str, Any], channel: type = Channel) -> Any:
    """Return a waitress server of app on the listening socket sock, with kvapp's loop."""
    server = create_server(app, sockets=[sock], **options)
    server.channel_class = channel
    _add_main_loop(server, app)
    return server


def serve(app: Any, sock: socket.socket, options: dict[str, Any]) -> None:
    """Serve app on the listening socket sock until SystemExit or KeyboardInterrupt."""
    build(app, sock, options).run()


def _add_main_loop(server: Any, app: Any) -> None:
    """Give server kvapp's main loop: run() passes it, and trigger pulls mark channels.

    app is the application served, as given: waitress 3 always wraps it in
    its proxy-headers middleware, so server.application is that wrapper.
    """
    server.main_loop = MainLoop(server)
    server.pull_trigger = _marking_pull(server.pull_trigger)
    server.maintenance = _maintenance(server)
    server.accept_pause = _AcceptPause(server)
    server.run = lambda: _run(server, app)
    # waitress-serve's --threads, not config.ini's, is what watchers share.
    fit_threads = getattr(app, "fit_threads", None)
    if fit_threads is not None:
        fit_threads(server.adj.threads)


def _run(server: Any, app: Any) -> None:
    try:
        server.main_loop.run(server.adj.asyncore_loop_timeout)
    except (SystemExit, KeyboardInterrupt):
        deadline = time.monotonic() + STOP_DRAIN_S
        # Watch streams and long-polls would run on: end them first.
        end_streams = getattr(app, "end_streams", None)
        if end_streams is not None:
            end_streams()
        _drain(server, deadline)
        # As waitress's own run(): let running tasks finish (up to 5 s) before
        # the caller closes the app; the trigger stays open for their last pull.
        server.task_dispatcher.shutdown()


def _drain(server: Any, deadline: float) -> None:
    """Run the loop, accepting nothing, until every answer is sent or deadline passes.

    The loop alone sends what a client's socket refused: once it stopped,
    the rest of an answer in the channel's buffers was lost when the
    process exited (a slow client of pipelined GETs of 1 MiB values got
    three and a part of the fourth).  A channel with no request left is
    closed once its buffers are sent (waitress's close_when_flushed), so
    it reads no new request; one whose requests still run (a stream
    ending, pipelined requests) is waited for.  A second stop signal ends
    the wait.

    At the end, what is still unsent is given up: its channels are closed,
    which wakes a task waiting for its client to take bytes (above
    outbuf_high_watermark).  waitress then waited its 5 s for that thread
    too, and a stop with a client that reads nothing took 9.1 s, near the
    supervisor's STOP_GRACE_S.
    """
    server.accept_pause.stop()
    loop = server.main_loop
    try:
        while time.monotonic() < deadline:
            waiting = False
            for fd, channel in list(server.active_channels.items()):
                if channel.requests:
                    waiting = True
                elif not channel.close_when_flushed and not channel.will_close:
                    channel.close_when_flushed = True
                    loop.mark(fd)
                waiting = waiting or bool(channel.total_outbufs_len)
            if not waiting:
                return
            loop.one_pass(min(0.1, max(0.0, deadline - time.monotonic())))
    except (SystemExit, KeyboardInterrupt):
        pass
    for channel in list(server.active_channels.values()):
        if channel.total_outbufs_len:
            channel.handle_close()


def adopt_waitress(app: Any = None) -> None:
    """Make the waitress servers this process builds from now on use Channel and MainLoop.

    For `waitress-serve wsgi:app`, which imports wsgi.py and then builds its
    server itself; app is wsgi.app, whose streams end when the server stops.
    A server of several listening sockets (waitress's MultiSocketServer)
    gets Channel but keeps waitress's loop.
    """
    global _adopted_app
    _adopted_app = app
    BaseWSGIServer.channel_class = Channel
    BaseWSGIServer.run = _adopted_run


_adopted_app: Any = None


def _adopted_run(server: Any) -> None:
    app = _adopted_app if _adopted_app is not None else server.application
    _add_main_loop(server, app)
    # As `kvapp serve` does: `--connection-limit=2050` (docs/guarantees.md)
    # is over Debian's default 1024 open files.
    warning = raise_open_files_limit(server.adj.connection_limit, server.adj.threads)
    if warning:
        server.logger.warning("%s", warning)
    if threading.current_thread() is threading.main_thread():
        # waitress-serve leaves SIGTERM at its default action, which ended the
        # process at once: watch streams cut without their last chunk,
        # long-polls unanswered.  As `kvapp serve`: stop in order.  (Only a
        # main thread may set a handler, and a server run in another thread
        # belongs to a program that handles its own signals.)
        Stopping.install()
    _run(server, app)
