"""Prometheus metrics, counted per process and summed over processes at scrape time.

Design, for several worker processes serving one database:
- On the request path a process only adds to dicts in its own memory, under
  one lock: a bisect and three dict updates per request, no I/O.
- A daemon thread adds those deltas to the shared metrics file (see
  kvapp.store.metricsfile) once a second, in one small transaction, and clears
  them; if that fails it keeps them and tries again.
- A scrape, on whichever worker it lands, first adds its own deltas, then
  reads the file: the sums of every process, at most one flush interval
  behind for the other workers.  A worker's unflushed counts are lost only
  if it is killed (at most one interval of them).
- Gauges (keys, database bytes) are read from the database at scrape time,
  so they are the same whichever worker answers.
Text exposition format 0.0.4:
https://prometheus.io/docs/instrumenting/exposition_formats/
"""

from __future__ import annotations

import logging
import threading
from bisect import bisect_left
from collections import defaultdict

from kvapp.store.base import StorageError
from kvapp.store.metricsfile import MetricsStore, Row

log = logging.getLogger("kvapp.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FLUSH_INTERVAL = 1.0

DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

REQUESTS = "kvapp_requests_total"
DURATION = "kvapp_request_duration_seconds"
COMMITS = "kvapp_commits_total"
BATCH = "kvapp_commit_batch_size"

_HELP = {
    REQUESTS: ("counter", "HTTP requests answered, by route, method and status code."),
    DURATION: ("histogram", "Seconds from the request reaching kvapp to its answer, by route."),
    "kvapp_keys": ("gauge", "Live keys in the store (expired keys not counted)."),
    "kvapp_database_bytes": (
        "gauge",
        "Bytes of the SQLite database file and its WAL, or of PostgreSQL's kv table.",
    ),
    COMMITS: ("counter", "Write transactions committed."),
    BATCH: ("histogram", "Writes (requests) per committed transaction."),
}


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound)).removesuffix(".0")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Deltas:
    """Counts since the last flush, in this process's memory."""

    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, str, int], int] = defaultdict(int)
        self.durations: defaultdict[tuple[str, int], int] = defaultdict(int)
        self.duration_sums: defaultdict[str, float] = defaultdict(float)
        self.batches: defaultdict[int, int] = defaultdict(int)
        self.batch_sum = 0

    def merge(self, other: _Deltas) -> None:
        for key, count in other.requests.items():
            self.requests[key] += count
        for bucket_key, count in other.durations.items():
            self.durations[bucket_key] += count
        for route, total in other.duration_sums.items():
            self.duration_sums[route] += total
        for bucket, count in other.batches.items():
            self.batches[bucket] += count
        self.batch_sum += other.batch_sum

    def rows(self) -> list[Row]:
        """Return the deltas as rows for the metrics file; histogram buckets not cumulated."""
        rows: list[Row] = []
        for (route, method, status), count in self.requests.items():
            labels = f'route="{_escape(route)}",method="{_escape(method)}",code="{status}"'
            rows.append((REQUESTS, labels, "", count))
        bounds = (*DURATION_BUCKETS, float("inf"))
        for (route, bucket), count in self.durations.items():
            rows.append((DURATION, f'route="{_escape(route)}"', _le(bounds[bucket]), count))
        for route, total in self.duration_sums.items():
            rows.append((DURATION, f'route="{_escape(route)}"', "sum", total))
        if self.batches:
            rows.append((COMMITS, "", "", sum(self.batches.values())))
            batch_bounds = (*BATCH_BUCKETS, float("inf"))
            for bucket, count in self.batches.items():
                rows.append((BATCH, "", _le(batch_bounds[bucket]), count))
            rows.append((BATCH, "", "sum", self.batch_sum))
        return rows


class Metrics:
    """This process's counters, and the exposition of every process's sums."""

    def __init__(self, store: MetricsStore, flush_interval: float = FLUSH_INTERVAL) -> None:
        self.store = store
        self.flush_interval = flush_interval
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._deltas = _Deltas()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing: str | None = None  # the failure logged last, until a flush succeeds

    # -- the request path ---------------------------------------------------

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        bucket = bisect_left(DURATION_BUCKETS, seconds)
        with self._lock:
            deltas = self._deltas
            deltas.requests[route, method, status] += 1
            deltas.durations[route, bucket] += 1
            deltas.duration_sums[route] += seconds

    def observe_commit(self, size: int) -> None:
        bucket = bisect_left(BATCH_BUCKETS, size)
        with self._lock:
            self._deltas.batches[bucket] += 1
            self._deltas.batch_sum += size

    # -- flushing -------------------------------------------------------------

    def start(self) -> None:
        """Start (or, in a forked child, restart) the thread that flushes once an interval."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="kvapp-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval):
            self.flush_in_background()

    def flush_in_background(self) -> None:
        """Flush, as the thread does once an interval; log a failure once, and the recovery.

        An unusable file (a folder that cannot be written) fails every
        second: logged each time, it filled the log with one line a second.
        """
        try:
            self.flush()
        except StorageError as exc:
            if str(exc) != self._failing:
                self._failing = str(exc)
                log.warning("metrics not saved yet, will retry every second: %s", exc)
            return
        except Exception:
            log.exception("metrics flush failed")
            return
        if self._failing is not None:
            self._failing = None
            log.warning("metrics saved again")

    def flush(self) -> None:
        """Add this process's deltas to the shared file; on failure keep them and raise."""
        with self._flush_lock:
            with self._lock:
                deltas, self._deltas = self._deltas, _Deltas()
            rows = deltas.rows()
            if not rows:
                return
            try:
                self.store.add(rows)
            except BaseException:
                with self._lock:
                    self._deltas.merge(deltas)
                raise

    def close(self) -> None:
        """Stop the flushing thread and save what is left, if the file takes it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        try:
            self.flush()
        except StorageError as exc:
            log.warning("metrics of this process not saved: %s", exc)
        self.store.close()

    # -- the scrape -------------------------------------------------------------

    def render(self, keys: int, database_bytes: int) -> str:
        """Return the exposition of every process's sums plus the given gauges."""
        self.flush()
        series: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
        for metric, labels, le, value in self.store.read():
            series[metric][labels][le] = value
        series["kvapp_keys"][""][""] = keys
        series["kvapp_database_bytes"][""][""] = database_bytes
        lines = []
        for metric, (kind, text) in _HELP.items():
            lines.append(f"# HELP {metric} {text}")
            lines.append(f"# TYPE {metric} {kind}")
            for labels, values in series[metric].items():
                if kind == "histogram":
                    buckets = DURATION_BUCKETS if metric == DURATION else BATCH_BUCKETS
                    lines.extend(_histogram(metric, labels, buckets, values))
                else:
                    lines.append(f"{metric}{_braces(labels)} {_number(values[''])}")
        return "\n".join(lines) + "\n"


def _braces(labels: str) -> str:
    return f"{{{labels}}}" if labels else ""


def _histogram(
    metric: str, labels: str, buckets: tuple[float, ...], values: dict[str, float]
) -> list[str]:
    """Return the cumulative _bucket lines, _sum and _count of one histogram series."""
    prefix = f"{labels}," if labels else ""
    lines, total = [], 0.0
    for bound in (*buckets, float("inf")):
        total += values.get(_le(bound), 0)
        lines.append(f'{metric}_bucket{{{prefix}le="{_le(bound)}"}} {_number(total)}')
    lines.append(f"{metric}_sum{_braces(labels)} {_number(values.get('sum', 0))}")
    lines.append(f"{metric}_count{_braces(labels)} {_number(total)}")
    return lines
