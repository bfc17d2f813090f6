"""waitress's main loop, asking only the channels that can have changed since the last pass.

waitress 3.0.2's loop (wasyncore.poll2) builds a new poll set on every pass
and asks every channel whether it is readable and writable, and it passes
about once per request.  With 1,000 idle keep-alive connections open that is
some 2,000 Python calls per request (measured, durable SET from 16 writers,
1 worker: 1,228 req/s with 1,000 idle connections open against 3,368
without; docs/performance.md), and with 256 busy connections it asks all
256 on every pass.  This loop keeps one poll set and asks only:
- each channel that had an event on the last pass (reading or writing
  changed it), and each channel added since;
- each channel a task thread marked: a task thread changes a channel only
  while it serves a request, and it marks the channel each time it pulls
  the trigger (after its changes) and when it ends the request
  (kvapp.server);
- the other dispatchers (the listening socket, the trigger), on every pass;
- every channel after the server's maintenance, which marks idle channels
  past channel_timeout for closing.
Nothing else changes a channel between passes.  The events and their
handling are waitress's own (wasyncore.readwrite).

The channels wait in an epoll(7) set, level-triggered, so a wait costs
the kernel the ready ones, not every registered one as poll(2) does: with
1,000 idle keep-alive connections open, a durable SET cost 200 to 290 µs
of system time under poll, 140 to 200 with epoll (docs/performance.md).
The other dispatchers (the listening socket, the trigger) and the epoll
set's own fd wait in a small poll set, as before: workers share the
listening socket, and poll(2) wakes them in the order they last began to
wait, while an epoll set stays queued on it in the order the workers
started, so the first one took nearly every connection (16 of 16, 15 of
16 opened at once; about 10 and 6 under poll).  epoll's event bits are
poll's.
"""

from __future__ import annotations

import select
import signal
from collections import deque
from typing import Any

from waitress import wasyncore
from waitress.channel import HTTPChannel

READ = select.POLLIN | select.POLLPRI
WRITE = select.POLLOUT


class Stopping:
    """The stop signals of a server process, acted on where the loop waits, not mid-send.

    A handler that raised SystemExit wherever the main thread was could land
    between a send and the buffer's skip of what it sent; the loop that then
    sends what answers still hold (kvapp.server._drain) sent those bytes
    again: a corrupt answer under a 200.  So handle() raises only before the
    loop runs or while it waits in poll(); otherwise the loop raises at its
    next wait.  Each signal is acted on once: a second one ends the drain.
    """

    received: list[type[BaseException]] = []  # what each stop signal asks to raise
    heeded = 0  # how many of them the loop has raised
    looping = False  # a loop has started
    waiting = False  # the main thread is about to wait, or waits, in poll()

    @classmethod
    def install(cls) -> None:
        """Make SIGTERM, SIGHUP (and Ctrl-C) stop the server in order: handle() them.

        Their default action ends the process at once: streams cut mid-chunk,
        long-polls unanswered, access lines not yet written lost.  An ignored
        signal stays ignored: `nohup` ignores SIGHUP, a worker SIGINT (the
        supervisor turns Ctrl-C into SIGTERM).
        """
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            if signal.getsignal(signum) is not signal.SIG_IGN:
                signal.signal(signum, cls.handle)

    @classmethod
    def handle(cls, signum: int, frame: Any) -> None:
        """The handler of SIGTERM and SIGHUP (SystemExit) and SIGINT (KeyboardInterrupt)."""
        cls.received.append(KeyboardInterrupt if signum == signal.SIGINT else SystemExit)
        if cls.waiting or not cls.looping:
            cls.check()

    @classmethod
    def check(cls) -> None:
        """Raise what the first stop signal not yet acted on asks for, if there is one."""
        if len(cls.received) > cls.heeded:
            cls.heeded += 1
            raise cls.received[cls.heeded - 1]


class MainLoop:
    """One server's loop: its map of dispatchers by fd, its wait sets, the fds to ask next."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.map: dict[int, Any] = server._map
        self.poller = select.epoll()  # the channels
        self.others = select.poll()  # the other dispatchers, and the epoll set
        self.others.register(self.poller.fileno(), select.POLLIN)
        self.registered: dict[int, int] = {}  # fd -> its flags in either set
        self.to_ask: set[int] = set()  # main thread only
        self.marked: deque[int] = deque()  # task threads append, the loop pops
        self.always: set[int] = set()  # dispatchers that are not channels
        self.ask_all = True

    # -- hooks: kvapp.server's Channel and serve() call these ---------------

    def added(self, fd: int) -> None:
        """A channel was added (main thread, on accept).

        Its fd may be a closed one's number that was never removed: the
        kernel dropped that file from the set when it closed, so its
        flags here are stale.
        """
        self._forget(fd)
        self.to_ask.add(fd)

    def removed(self, fd: int) -> None:
        """A channel was removed, before its socket closes.

        Usually on the main thread; waitress may also close a channel from
        its task thread (a failed send of 100 Continue), so this tolerates
        the loop having dropped the fd already.
        """
        self._forget(fd)
        self.to_ask.discard(fd)

    def _forget(self, fd: int) -> None:
        if self.registered.pop(fd, None) is not None:
            try:
                if fd in self.always:
                    self.others.unregister(fd)
                else:
                    self.poller.unregister(fd)
            except (KeyError, OSError):  # closed already (EBADF), or not that file's (ENOENT)
                pass

    def mark(self, fd: int) -> None:
        """Ask the channel of fd on the next pass (any thread; deque appends are atomic)."""
        self.marked.append(fd)

    # -- the loop ------------------------------------------------------------

    def run(self, timeout: float) -> None:
        """Pass until the map is empty, waiting at most timeout seconds per pass."""
        Stopping.looping = True
        while self.map:
            self.one_pass(timeout)

    def one_pass(self, timeout: float) -> None:
        cleanup = self.server.next_channel_cleanup
        if self.ask_all:
            self.ask_all = False
            asking = set(self.map)
            self.always = {
                fd for fd, obj in list(self.map.items()) if not isinstance(obj, HTTPChannel)
            }
        else:
            asking = self.to_ask
            marked = self.marked
            while marked:
                asking.add(marked.popleft())
            asking |= self.always
        self.to_ask = set()
        for fd in asking:
            obj = self.map.get(fd)
            if obj is None:
                self.removed(fd)
            else:
                self._ask(fd, obj)
        if self.server.next_channel_cleanup != cleanup:
            # The listening socket's readable() ran the maintenance: it may
            # have marked idle channels for closing.
            self.ask_all = True
        Stopping.waiting = True
        try:
            Stopping.check()  # a signal that came while the pass ran
            events = self.others.poll(int(timeout * 1000))
        except InterruptedError:
            events = []
        finally:
            Stopping.waiting = False
        epoll_fd = self.poller.fileno()
        if any(fd == epoll_fd for fd, _ in events):
            events = [event for event in events if event[0] != epoll_fd]
            events += self.poller.poll(0)
        for fd, flags in events:
            obj = self.map.get(fd)
            if obj is None:
                self.removed(fd)  # left the map without del_channel: stop polling it
            else:
                wasyncore.readwrite(obj, flags)
                self.to_ask.add(fd)

    def _ask(self, fd: int, obj: Any) -> None:
        """Put in its wait set what obj waits for now, as poll2 would."""
        flags = READ if obj.readable() else 0
        if obj.writable() and not obj.accepting:
            flags |= WRITE
        before = self.registered.get(fd)
        if flags and flags != before and fd in self.always:
            self.others.register(fd, flags)  # on a registered fd: modify
            self.registered[fd] = flags
        elif flags and flags != before:
            try:
                self._set(fd, flags, before)
            except OSError:
                # A task thread closed the channel since the loop read the
                # map (waitress may, sending 100 Continue): EBADF, or EPERM
                # if the number is already another file's.  poll took such
                # an fd quietly; the next pass finds it gone from the map.
                self.registered.pop(fd, None)
                self.to_ask.add(fd)
                return
            self.registered[fd] = flags
        elif not flags and before is not None:
            # poll2 leaves such a channel out of the set: no hang-up is
            # reported while its task runs.
            self.removed(fd)

    def _set(self, fd: int, flags: int, before: int | None) -> None:
        """Register fd in the epoll set with flags, or change its flags."""
        try:
            if before is None:
                self.poller.register(fd, flags)
            else:
                self.poller.modify(fd, flags)
        except FileExistsError:
            self.poller.modify(fd, flags)
        except FileNotFoundError:  # its file closed and the number came back
            self.poller.register(fd, flags)
