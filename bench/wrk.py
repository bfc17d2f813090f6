"""The load: wrk with one Lua script per scenario, its figures read back as JSON."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from bench.servers import VALUE

INSTALL_HINT = "wrk is not installed: apt-get install wrk (Debian/Ubuntu), brew install wrk"

# Every script ends with this: wrk calls done() once, with all threads' figures.
# Latencies are in microseconds; errors.status counts answers >= 400;
# unsucceeded sums the threads' own count of answers that said the request
# did not do its work (only the txn script counts any).
_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  local unsucceeded = 0
  for _, thread in ipairs(threads or {}) do
    unsucceeded = unsucceeded + (thread:get("unsucceeded") or 0)
  end
  io.write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "connect_errors": %d, "read_errors": %d,'
    .. ' "write_errors": %d, "timeouts": %d, "status_errors": %d, "unsucceeded": %d,'
    .. ' "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout, e.status,
    unsucceeded,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""

# wrk runs each thread in its own Lua state; setup() numbers them so that
# generated keys differ between threads, and the run tag between runs, and
# keeps them so that done() can read their counters.
_THREADS = r"""
local next_id = 0
threads = {}
setup = function(thread)
  next_id = next_id + 1
  thread:set("id", next_id)
  table.insert(threads, thread)
end
"""

# Requests for `keys` existing keys (key-000000001 ...) in a shuffled table,
# built once per thread so that request() only indexes it.
_KEY_TABLE = r"""
local reqs = {}
init = function(args)
  local keys = tonumber(args[1])
  math.randomseed(id * 7919)
  for i = 1, keys do reqs[i] = wrk.format("GET", string.format(PATTERN, i)) end
  for i = keys, 2, -1 do
    local j = math.random(i)
    reqs[i], reqs[j] = reqs[j], reqs[i]
  end
end
local n = 0
request = function()
  n = n % #reqs + 1
  return reqs[n]
end
"""

# The ceiling of each scenario is the hello-world app driven by the same script,
# so that wrk does the same work per request for both (it shares the cores).
SCRIPTS: dict[str, str] = {
    "get-hit": _THREADS + _KEY_TABLE.replace("PATTERN", '"/get?key=key-%09d"'),
    "get-miss": _THREADS + _KEY_TABLE.replace("PATTERN", '"/get?key=missing-%09d"'),
    "set-unique": _THREADS
    + r"""
local tag, n = "", 0
init = function(args) tag = args[2] end
request = function()
  n = n + 1
  return wrk.format("GET", string.format("/set?u%s-%d-%d=VALUE", tag, id, n))
end
""",
    "set-hot": "wrk.path = '/set?hot=VALUE'\n",
    "mix": _THREADS
    + r"""
local keys = 1
init = function(args)
  keys = tonumber(args[1])
  math.randomseed(id * 104729)
end
request = function()
  local k = math.random(keys)
  if math.random(10) == 1 then
    return wrk.format("GET", string.format("/set?key-%09d=VALUE", k))
  end
  return wrk.format("GET", string.format("/get?key=key-%09d", k))
end
""",
    # The scale part: any of `keys` keys at random, read or overwritten.
    "get-random": _THREADS
    + r"""
local keys = 1
init = function(args)
  keys = tonumber(args[1])
  math.randomseed(id * 15485863)
end
request = function()
  return wrk.format("GET", string.format("/get?key=key-%09d", math.random(keys)))
end
""",
    "set-random": _THREADS
    + r"""
local keys = 1
init = function(args)
  keys = tonumber(args[1])
  math.randomseed(id * 32452843)
end
request = function()
  return wrk.format("GET", string.format("/set?key-%09d=VALUE", math.random(keys)))
end
""",
}

# txn: each request is one POST /txn with 2 conditions and 2 puts of VALUE.
# It is built to succeed every time at any connection count, so that the cell
# measures transactions that commit, not ones that fall through to an empty else:
#   - if: exists: true on a loaded key picked at random (no cell deletes those
#     keys, so it holds; the transaction checks a key it does not write, as a
#     guard on another record does), and exists: false on the first key it
#     puts (create-only, as If-None-Match: *);
#   - then: 2 puts of new keys, unique as set-unique's are (run tag, wrk
#     thread, request count), so no two requests, on whichever connection,
#     write a key in common or make each other's conditions fail.
# Conditions on keys that other connections also write (an ETag read back from
# an earlier answer) would measure contention and retries instead, and wrk's
# threads cannot share what they read.  response() counts the answers below
# 400 that do not say succeeded: true: errors for kvapp, not for the
# hello-world ceiling, which runs this same script (and so the same Lua).
SCRIPTS["txn"] = (
    _THREADS
    + r"""
local tag, n, keys = "", 0, 1
local headers = {["Content-Type"] = "application/json"}
init = function(args)
  keys = tonumber(args[1])
  tag = args[2]
  math.randomseed(id * 49979687)
end
request = function()
  n = n + 1
  local key = string.format("t%s-%d-%d", tag, id, n)
  local body = string.format(
    '{"if": [{"key": "key-%09d", "exists": true}, {"key": "%s-a", "exists": false}],'
    .. ' "then": [{"put": "%s-a", "value": "VALUE"}, {"put": "%s-b", "value": "VALUE"}]}',
    math.random(keys), key, key, key)
  return wrk.format("POST", "/txn", headers, body)
end
unsucceeded = 0
response = function(status, _, body)
  if status < 400 and not string.find(body, '"succeeded": true', 1, true) then
    unsucceeded = unsucceeded + 1
  end
end
"""
)

# set-idle: set-unique's load while IDLE_CONNECTIONS other keep-alive
# connections, each having made one request, stay open and silent.
SCRIPTS["set-idle"] = SCRIPTS["set-unique"]
IDLE_CONNECTIONS = 1000

# Answers that each scenario must get from kvapp: for get-miss every one is a
# 404.  The hello-world app answers 200 to everything.
ALL_404 = {"get-miss"}
# Scenarios whose every answer below 400 from kvapp must say succeeded: true.
MUST_SUCCEED = {"txn"}


class Result(NamedTuple):
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors, timeouts, answers of an unexpected status, txns not succeeded

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def find_wrk() -> str | None:
    return shutil.which("wrk")


def run(
    url: str,
    scenario: str,
    connections: int,
    duration: int,
    keys: int = 1000,
    tag: str = "0",
    wrk: str = "wrk",
    all_404: bool | None = None,
    must_succeed: bool | None = None,
) -> Result:
    """Run wrk against url for duration seconds (wrk takes whole seconds); return its figures.

    all_404: every answer must be a 404, else below 400 (default: what kvapp must answer).
    must_succeed: a transaction that did not succeed counts as an error (default: as
    all_404; the hello-world ceiling passes False to both).
    """
    if all_404 is None:
        all_404 = scenario in ALL_404
    if must_succeed is None:
        must_succeed = scenario in MUST_SUCCEED
    idle = IDLE_CONNECTIONS if scenario == "set-idle" else 0
    with idle_connections(url, idle) as failed:
        result = _run(
            url, SCRIPTS[scenario], connections, duration, keys, tag, wrk, all_404, must_succeed
        )
        idle_failures = failed()
    return result._replace(errors=result.errors + idle_failures)


@contextlib.contextmanager
def idle_connections(url: str, count: int) -> Iterator[Callable[[], int]]:
    """Hold count keep-alive connections open, each after one answered request (any status).

    Yields a function that returns how many of them failed: not answered
    within 10 s (the server did not take the connection), or closed before
    the end.
    """
    host, _, port = url.removeprefix("http://").partition(":")
    # A read of a missing key: answered without touching the write lock.
    request = f"GET /get?key=idle HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    sockets: list[socket.socket] = []
    failures = 0
    try:
        for _ in range(count):
            sock = socket.create_connection((host, int(port)), timeout=10)
            sockets.append(sock)
            sock.sendall(request)
        deadline = time.monotonic() + 10
        for sock in sockets:
            try:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                if not _read_answer(sock).startswith(b"HTTP/1.1 "):
                    failures += 1
            except OSError:
                failures += 1
        yield lambda: failures + sum(_closed(sock) for sock in sockets)
    finally:
        for sock in sockets:
            sock.close()


def _read_answer(sock: socket.socket) -> bytes:
    """Return one whole answer read from sock: its head and Content-Length bytes of body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return data


def _closed(sock: socket.socket) -> bool:
    """Return True if the server closed sock (or sent anything unasked)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) is not None
    except BlockingIOError:
        return False
    except OSError:
        return True


def run_script(
    url: str, script: str, connections: int, duration: int, keys: int, tag: str
) -> Result:
    """Run wrk with script (a SCRIPTS entry in another server's URLs); every answer < 400."""
    if find_wrk() is None:
        raise RuntimeError(INSTALL_HINT)
    return _run(url, script, connections, duration, keys, tag, "wrk", False, False)


def _run(
    url: str,
    script_text: str,
    connections: int,
    duration: int,
    keys: int,
    tag: str,
    wrk: str,
    all_404: bool,
    must_succeed: bool,
) -> Result:
    script = script_text.replace("VALUE", VALUE) + _DONE
    threads = min(2, connections)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(script)
    try:
        command = [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration}s"]
        command += ["--timeout", "10s", "-s", handle.name, url, "--", str(keys), tag]
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=duration + 60, check=False
        )
    finally:
        Path(handle.name).unlink()
    line = next((ln for ln in completed.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if completed.returncode != 0 or line is None:
        raise RuntimeError(
            f"wrk failed ({completed.returncode}): {completed.stderr.strip() or completed.stdout}"
        )
    figures = json.loads(line[len("BENCH ") :])
    status = figures["status_errors"]
    unexpected = figures["requests"] - status if all_404 else status
    if must_succeed:
        unexpected += figures["unsucceeded"]
    errors = unexpected + sum(
        figures[name] for name in ("connect_errors", "read_errors", "write_errors", "timeouts")
    )
    return Result(
        requests=figures["requests"],
        seconds=figures["duration_us"] / 1e6,
        p50_ms=figures["p50_us"] / 1000,
        p99_ms=figures["p99_us"] / 1000,
        errors=errors,
    )
