"""How kvapp runs waitress: one process's server on a listening socket, and its channel.

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
"""

from __future__ import annotations

import resource
import socket
from typing import Any

from waitress.channel import HTTPChannel
from waitress.server import create_server

# While a task runs, its own thread sends what it writes; the main loop
# helps only once this much is waiting (a client that reads slowly, a large
# value), well below waitress's outbuf_high_watermark (16 MiB), where the
# task thread stops and waits for the main loop to send.
LOOP_FLUSH_BYTES = 1024 * 1024


class Channel(HTTPChannel):
    """waitress's HTTPChannel, without the busy loop while a task writes its answer."""

    def writable(self) -> bool:
        """Return True if the main loop should send now: no task runs, or much is waiting."""
        if self.requests and self.total_outbufs_len < LOOP_FLUSH_BYTES:
            # The task thread sends its own output; when it ends, service()
            # pulls the trigger and the main loop sends whatever is left.
            return bool(self.will_close or self.close_when_flushed)
        return bool(super().writable())


# Files a process keeps open besides its connections: the listening socket,
# waitress's trigger pipe, SQLite's database, WAL and -shm per connection, the
# -gen and metrics files, the log.
SPARE_FILES = 64


def raise_open_files_limit(connection_limit: int) -> str | None:
    """Raise this process's soft RLIMIT_NOFILE to fit connection_limit; return a warning or None.

    Debian's default soft limit is 1024 open files; each connection is one.
    The soft limit may rise up to the hard one without privilege (getrlimit(2)).
    """
    needed = connection_limit + SPARE_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < needed:
        return (
            f"connection_limit = {connection_limit} needs {needed} open files, but the limit is"
            f" {soft} (ulimit -n); connections beyond it will fail: lower connection_limit"
            " or raise the hard limit (LimitNOFILE= in a systemd unit)"
        )
    return None


def serve(app: Any, sock: socket.socket, options: dict[str, Any]) -> None:
    """Serve app on the listening socket sock until SystemExit or KeyboardInterrupt."""
    server = create_server(app, sockets=[sock], **options)
    server.channel_class = Channel
    # run() closes the server on SystemExit and KeyboardInterrupt.
    server.run()
