"""A TCP proxy between kvapp and PostgreSQL that can cut the network off silently.

While it drops, it keeps every connection open and reads what either side
sends, but forwards nothing: no byte, no FIN, no RST.  To kvapp that is a
server that stopped answering, which is what a partition, a frozen server
or a synchronous standby that is gone look like from a client whose
packets are still acknowledged.  (Lost acknowledgements as well, which
tcp_user_timeout and keepalives catch, would need a packet filter.)

It can also start dropping in the middle of a commit: when the client sends
a message holding COMMIT, either before the server gets it (the server
rolls back) or right after (the server commits, and its answer is lost).

heal() forwards again.  A connection that lost bytes while dropping has a
broken protocol stream, so heal() closes it on both sides, as the server's
and the client's timeouts would end it in a real partition; a connection
that was idle through the drop carries on.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field


@dataclass
class _Pair:
    client: socket.socket
    server: socket.socket
    lost: bool = False  # a byte was dropped, or an end was not passed on
    closed: bool = False


@dataclass
class Proxy:
    """Listens on 127.0.0.1 (a port the kernel picks) and forwards to 127.0.0.1:target."""

    target: int
    port: int = 0
    dropping: bool = False
    # b"COMMIT": start dropping at the first client message that holds it.
    drop_at: bytes | None = None
    deliver_trigger: bool = False  # forward that message before dropping
    triggered: threading.Event = field(default_factory=threading.Event)
    _pairs: list[_Pair] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _listener: socket.socket | None = None

    def start(self) -> Proxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        self._listener = listener
        self.port = listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def url(self, database_url: str) -> str:
        """Return database_url with its port replaced by the proxy's."""
        host, _, rest = database_url.partition(f":{self.target}/")
        assert rest, database_url
        return f"{host}:{self.port}/{rest}"

    def drop(self) -> None:
        """Forward nothing from now on, in either direction, and close nothing."""
        with self._lock:
            self.dropping = True

    def drop_at_commit(self, deliver: bool) -> None:
        """Drop from the next client message holding COMMIT on (that one forwarded if deliver)."""
        with self._lock:
            self.triggered.clear()
            self.drop_at, self.deliver_trigger = b"COMMIT", deliver

    def heal(self) -> None:
        """Forward again; close the connections whose stream lost bytes while dropping."""
        with self._lock:
            self.dropping = False
            self.drop_at = None
            broken = [pair for pair in self._pairs if pair.lost and not pair.closed]
        for pair in broken:
            self._close(pair)

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            self._close(pair)

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            pair = _Pair(client, server)
            with self._lock:
                self._pairs.append(pair)
            for source, sink, upstream in ((client, server, True), (server, client, False)):
                threading.Thread(
                    target=self._pump, args=(pair, source, sink, upstream), daemon=True
                ).start()

    def _pump(
        self, pair: _Pair, source: socket.socket, sink: socket.socket, upstream: bool
    ) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            with self._lock:
                forward = not self.dropping
                if forward and upstream and self.drop_at is not None and self.drop_at in data:
                    self.dropping = True
                    self.drop_at = None
                    forward = self.deliver_trigger
                    self.triggered.set()
                if not forward:
                    pair.lost = True
            if not data:
                if forward:
                    self._close(pair)
                return  # while dropping, the end is not passed on: heal() closes
            if forward:
                try:
                    sink.sendall(data)
                except OSError:
                    self._close(pair)
                    return

    def _close(self, pair: _Pair) -> None:
        with self._lock:
            if pair.closed:
                return
            pair.closed = True
        for sock in (pair.client, pair.server):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
