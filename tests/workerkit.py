"""Worker processes of `python -m kvapp serve` seen from a test: which process holds a connection.

Linux only: a connection's server socket is found in /proc/net/tcp, and its
owner among the workers' open files.
"""

from __future__ import annotations

import http.client
import os
import time
from contextlib import contextmanager
from pathlib import Path

from helpers import KvappServer, child_pids


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def workers_of(server: KvappServer, count: int) -> list[int]:
    """Wait until server's process has count live children; return their ids."""
    return wait_for(
        lambda: len(pids := child_pids(server.proc.pid)) == count and pids,
        what=f"{count} workers",
    )


def socket_inode(server_port: int, client_port: int) -> int:
    """Return the inode of the server side of an established loopback TCP connection."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            next(handle)
            for line in handle:
                fields = line.split()
                local, remote, inode = fields[1], fields[2], int(fields[9])
                if (
                    int(local.rsplit(":", 1)[1], 16) == server_port
                    and int(remote.rsplit(":", 1)[1], 16) == client_port
                ):
                    return inode
    raise AssertionError(f"no server socket for client port {client_port}")


def owner(inode: int, pids: list[int]) -> int:
    """Return which of pids holds the socket with this inode."""
    target = f"socket:[{inode}]"
    for pid in pids:
        fds = Path(f"/proc/{pid}/fd")
        for fd in fds.iterdir():
            try:
                if os.readlink(fd) == target:
                    return pid
            except OSError:
                continue
    raise AssertionError(f"no worker among {pids} holds {target}")


class Client:
    """One keep-alive connection, and the worker process that accepted it."""

    def __init__(self, port: int, workers: list[int]) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.request("/")  # answered, so accepted: the worker holds the socket now
        inode = socket_inode(port, self.conn.sock.getsockname()[1])
        self.worker = owner(inode, workers)

    def request(self, target: str) -> tuple[int, bytes]:
        self.conn.request("GET", target)
        response = self.conn.getresponse()
        return response.status, response.read()


@contextmanager
def one_client_per_worker(port: int, workers: list[int], tries: int = 300):
    """Open fresh connections until every worker holds one; yield {worker pid: Client}."""
    clients: dict[int, Client] = {}
    opened = []
    try:
        for _ in range(tries):
            # Spare connections stay open, so that the next connect may land elsewhere.
            client = Client(port, workers)
            opened.append(client)
            clients.setdefault(client.worker, client)
            if len(clients) == len(workers):
                break
        assert sorted(clients) == workers, f"connections reached only {sorted(clients)}"
        yield clients
    finally:
        for client in opened:
            client.conn.close()
