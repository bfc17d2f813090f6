"""Writers with a ledger, for the tests that cut the database off under load.

Each writer thread PUTs /kv/<prefix>-<number>-<n>, every key once, until
told to stop, and records every answer with when it was sent and received.
The ledger then says which writes were acknowledged, which were refused
with "nothing was stored", and which were answered "may or may not be
stored": the tests compare each class with what the database holds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from faultkit import Client

DEADLINE = 30.0  # seconds: the longest any wait of these tests may take

UNKNOWN = b"may or may not be stored"
NOTHING = b"nothing was stored"


def wait_until(condition: Callable[[], object], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.05)


def timed_get(client: Client, target: str) -> tuple[int, bytes, float]:
    """GET target; return (status, body, seconds it took)."""
    sent = time.monotonic()
    status, _, body = client.get(target)
    return status, body, time.monotonic() - sent


@dataclass
class Answer:
    key: str
    status: int
    sent: float  # time.monotonic() when the request went out
    received: float  # and when its answer came back
    body: bytes

    @property
    def seconds(self) -> float:
        return self.received - self.sent


@dataclass
class Ledger:
    """Every answer of every writer, and what went wrong in a writer thread."""

    answers: list[Answer] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, answer: Answer) -> None:
        with self.lock:
            self.answers.append(answer)

    def all(self) -> list[Answer]:
        with self.lock:
            return list(self.answers)

    def acknowledged(self) -> list[Answer]:
        return [answer for answer in self.all() if answer.status == 201]

    def refused(self) -> list[Answer]:
        """The 503s that say nothing was stored."""
        return [a for a in self.all() if a.status == 503 and NOTHING in a.body]

    def unknown(self) -> list[Answer]:
        """The 503s that say the write may or may not be stored."""
        return [a for a in self.all() if a.status == 503 and UNKNOWN in a.body]


def writer(
    port: int, number: int, ledger: Ledger, stop: threading.Event, prefix: str = "k"
) -> None:
    """PUT /kv/<prefix>-<number>-<n>, n = 0, 1, ... (each key once), until stop; record each."""
    client = Client(port, timeout=DEADLINE)
    try:
        for n in range(10**9):
            if stop.is_set():
                break
            key = f"{prefix}-{number}-{n}"
            sent = time.monotonic()
            status, _, body = client.request("PUT", f"/kv/{key}", key.encode())
            ledger.record(Answer(key, status, sent, time.monotonic(), body))
            if status != 201:
                time.sleep(0.05)  # as a client backing off; 503s must not spin
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        with ledger.lock:
            ledger.errors.append(exc)
    finally:
        client.close()


class Writers:
    """count writer threads on one server, started at once, stopped and joined by stop()."""

    def __init__(self, port: int, count: int, prefix: str = "k") -> None:
        self.ledger = Ledger()
        self._stop = threading.Event()
        self.threads = [
            threading.Thread(target=writer, args=(port, n, self.ledger, self._stop, prefix))
            for n in range(count)
        ]
        for thread in self.threads:
            thread.start()

    def stop(self) -> Ledger:
        self._stop.set()
        for thread in self.threads:
            thread.join(timeout=DEADLINE + 10)
        assert not any(thread.is_alive() for thread in self.threads)
        assert not self.ledger.errors, self.ledger.errors
        return self.ledger
