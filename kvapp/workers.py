"""Worker processes: one listening socket, N forked waitress processes, one supervisor.

The parent binds the socket once and forks; every child inherits it and
accepts from it, so the kernel hands each new connection to whichever worker
is free.  Each child builds its own app, and so opens its own SQLite
connections, after the fork: a connection must never cross a fork
(https://sqlite.org/howtocorrupt.html#_carrying_an_open_database_connection_across_a_fork_).
SQLite's own file locks then keep the processes consistent: a write committed
by one worker is seen by the next read transaction of every other one.

The parent only supervises: it restarts a worker that dies, gives up when
workers keep dying, and on SIGTERM, SIGINT or SIGHUP stops every worker and waits
for them.  On Linux a worker also gets SIGTERM when the parent dies, even by
SIGKILL (prctl PR_SET_PDEATHSIG), so no worker outlives its supervisor.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from kvapp.mainloop import Stopping
from kvapp.store.base import DatabaseUnusable

# A worker that dies is replaced, unless this many died within the window:
# then something is wrong with the setup (the database, the disk) and
# restarting forever would only hide it.
MAX_DEATHS = 5
DEATH_WINDOW_S = 30.0
# How long the workers get to finish on SIGTERM before they are killed.
STOP_GRACE_S = 10.0
_PR_SET_PDEATHSIG = 1
# SIGHUP too: a closed terminal sends it, and an operator used to nginx sends
# it to reload.  kvapp has no reload: it stops in order, as on SIGTERM (its
# default action cut streams mid-chunk and lost access lines not yet written).
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def listen(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """Return a listening TCP socket bound to host and port (port 0: a free one).

    An IPv6 address may come in brackets, as in a URL and in allowed_hosts.
    """
    family, _, _, _, address = socket.getaddrinfo(
        _unbracketed(host), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    return socket.create_server(address[:2], family=family, backlog=backlog)


def _unbracketed(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _url_host(host: str) -> str:
    """Return host as a URL writes it: an IPv6 address in brackets."""
    host = _unbracketed(host)
    return f"[{host}]" if ":" in host else host


def serve(
    make_app: Callable[[], Any],
    options: dict[str, Any],
    workers: int = 1,
    banner: str = "serving",
    log: Callable[[str], None] | None = None,
    notes: Sequence[str] = (),
) -> int:
    """Serve make_app() with waitress in `workers` processes; return the exit status.

    options are waitress.serve() keywords including host and port.  The app is
    built once here first, so that an unusable database stops the command
    with one message before any worker starts; so does a port in use (status 1).
    Once listening, the banner line is logged, then each of notes.
    """
    log = log or _stderr
    options = dict(options)
    host, port = options.pop("host"), options.pop("port")
    from kvapp import server

    # Before the app and the socket: the limit is inherited by every worker.
    warning = server.raise_open_files_limit(
        options.get("connection_limit", 100), options.get("threads", 4)
    )
    if warning:
        log(warning)
    # The app first, the socket second: once the port accepts connections the
    # database exists and has been checked, so "listening" means "ready".
    app = make_app()
    try:
        sock = listen(host, port, options.get("backlog", 1024))
    except OSError as exc:
        _close(app)
        if isinstance(exc, socket.gaierror):  # its errno is getaddrinfo's, not errno's
            reason = f"{exc.strerror}; check the host setting (--host or KVAPP_HOST)"
        else:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                # EACCES: a port below 1024 without the privilege (ip(7)).
                reason += "; choose another port with --port or KVAPP_PORT"
        log(f"cannot listen on {_url_host(host)}:{port}: {reason}")
        return 1
    try:
        port = sock.getsockname()[1]
        log(
            f"{banner} on http://{_url_host(host)}:{port}"
            f" with {workers} worker{'s' * (workers > 1)}"
        )
        for note in notes:
            log(note)
        if workers == 1:
            Stopping.install()
            _serve_one(app, sock, options)
            return 0
        _close(app)
        return Supervisor(make_app, sock, options, workers, log).run()
    finally:
        sock.close()


def _serve_one(app: Any, sock: socket.socket, options: dict[str, Any]) -> None:
    from kvapp import server

    try:
        # waitress stops its loop and its threads on SystemExit or KeyboardInterrupt.
        server.serve(app, sock, options)
    finally:
        _close(app)


def _close(app: Any) -> None:
    close = getattr(app, "close", None)
    if close is not None:
        close()


def _stderr(message: str) -> None:
    print(f"kvapp: {message}", file=sys.stderr, flush=True)


class Supervisor:
    """Forks the workers, replaces dead ones, stops them all on SIGTERM or SIGINT."""

    def __init__(
        self,
        make_app: Callable[[], Any],
        sock: socket.socket,
        options: dict[str, Any],
        workers: int,
        log: Callable[[str], None],
    ) -> None:
        self.make_app = make_app
        self.sock = sock
        self.options = options
        self.workers = workers
        self.log = log
        self.children: set[int] = set()
        self.deaths: list[float] = []
        self.stop_signal = 0

    def run(self) -> int:
        """Supervise until a stop signal (return 0) or workers keep dying (return 1)."""
        previous = {signum: signal.signal(signum, self._on_stop_signal) for signum in _STOP_SIGNALS}
        try:
            for _ in range(self.workers):
                self._fork()
            self.log(f"{self.workers} workers started: {' '.join(map(str, self.children))}")
            while not self.stop_signal:
                for pid, how in self._reap():
                    self.log(f"worker {pid} {how}")
                    if not self._may_restart():
                        self.log(
                            f"{len(self.deaths)} workers died within {DEATH_WINDOW_S:.0f} s;"
                            " stopping (see the errors above)"
                        )
                        return 1
                    self._fork()
                time.sleep(0.1)
            self.log(f"{signal.Signals(self.stop_signal).name}: stopping the workers")
            return 0
        finally:
            self._stop_children()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        self.stop_signal = signum

    def _may_restart(self) -> bool:
        now = time.monotonic()
        self.deaths = [t for t in self.deaths if now - t < DEATH_WINDOW_S] + [now]
        return len(self.deaths) < MAX_DEATHS

    def _fork(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        parent = os.getpid()
        # Block the stop signals across the fork, so that none reaches the
        # child before it has its own handlers; the parent gets them right after.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                _worker_main(self.make_app, self.sock, self.options, parent)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        self.children.add(pid)

    def _reap(self) -> list[tuple[int, str]]:
        """Return (pid, how it ended) for each child that has exited."""
        ended = []
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in self.children:
                self.children.discard(pid)
                ended.append((pid, _describe_status(status)))
        return ended

    def _stop_children(self) -> None:
        """SIGTERM every worker, wait up to STOP_GRACE_S, then SIGKILL the rest."""
        for pid in self.children:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while self.children and time.monotonic() < deadline:
            self._reap()
            if self.children:
                time.sleep(0.05)
        for pid in self.children:
            self.log(f"worker {pid} did not stop within {STOP_GRACE_S:.0f} s; killing it")
            _signal(pid, signal.SIGKILL)
        while self.children:
            pid = next(iter(self.children))
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            self.children.discard(pid)


def _worker_main(
    make_app: Callable[[], Any], sock: socket.socket, options: dict[str, Any], parent: int
) -> None:
    """Run one worker in a forked child (stop signals blocked); never return."""
    status = 1
    try:
        # Ctrl-C reaches the whole process group; the parent turns it into
        # one orderly SIGTERM per worker.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        Stopping.install()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        _die_with_parent(parent)
        _serve_one(make_app(), sock, options)
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    except DatabaseUnusable as exc:  # at start, as the parent says it: one line
        _stderr(f"worker {os.getpid()}: {exc}")
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGTERM this process when its parent dies; exit if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: SIGTERM to the parent still stops the workers
    if os.getppid() != parent:
        raise SystemExit(0)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"
