"""Moving records: export to a file, import from one, copy between stores.

All three stream in constant memory, PAGE records at a time, in key order:
reads page through dump(after, PAGE), writes go through load(batch), one
bounded transaction per batch, so a live server sharing the database waits
for one batch at most, never for the whole run.

A run over a live store is not a point-in-time copy: each page is read when
its turn comes.  For one snapshot of a live SQLite database, take a backup
and export or copy the backup.

Import and copy into an existing store are resumable: records keep their
revisions, so loading the same records again changes nothing, and a run
that failed part-way is finished by running it again with --merge.  Into an
empty store, a failed run deletes what it loaded, and a new SQLite file
appears only when complete (kvapp.tools.targets.destination).
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from kvapp.store.base import Delete, Record, Write
from kvapp.tools import exportformat
from kvapp.tools.progress import NoBar
from kvapp.tools.targets import Target

# Records per dump() page and per load() transaction: large enough that the
# per-transaction fsync costs little, small enough that a batch takes a
# fraction of a second and a few MB of memory with typical values.
PAGE = 1000


@dataclass
class Tally:
    """How far a load got: records loaded, and the last key loaded (keys come in order)."""

    records: int = 0
    last_key: str | None = None


def records(store: Any, page: int = PAGE) -> Iterator[Record]:
    """Yield every live record of store in UTF-8 byte order of keys, page by page."""
    after = None
    while True:
        batch = store.dump(after, page)
        yield from batch
        if len(batch) < page:
            return
        after = batch[-1].key


def export(store: Any, out: IO[bytes], bar: Any = None) -> int:
    """Write store's records to out in the export format; return how many."""
    bar = NoBar() if bar is None else bar  # not `or`: a tqdm without total has no truth value
    out.write(exportformat.header())
    count = 0
    for record in records(store):
        out.write(exportformat.encode(record))
        count += 1
        if count % PAGE == 0:
            bar.update(PAGE)
    bar.update(count % PAGE)
    out.write(exportformat.trailer(count))
    return count


def load(source: Iterable[Record], target: Target, tally: Tally, bar: Any = None) -> int:
    """Load source's records, in key order, into target, PAGE per transaction; return how many.

    On any failure the exception goes on, and tally says what the target
    keeps: nothing from a fresh file (it is discarded) or an empty store
    (what was loaded is deleted again), else the records loaded so far.
    """
    bar = NoBar() if bar is None else bar  # not `or`: a tqdm without total has no truth value
    iterator = iter(source)
    # The last key of the batch being loaded: a load that failed may still
    # have committed (PostgreSQL's OutcomeUnknown, a lost answer to COMMIT).
    attempted: str | None = None
    try:
        while batch := list(itertools.islice(iterator, PAGE)):
            attempted = batch[-1].key
            target.store.load(batch)
            tally.records += len(batch)
            tally.last_key = attempted
            bar.update(len(batch))
    except BaseException:
        if target.empty and attempted is not None:
            if not target.fresh:
                erase_through(target.store, attempted)
            tally.records, tally.last_key = 0, None
        raise
    return tally.records


def erase_through(store: Any, last_key: str) -> None:
    """Delete every live key of store up to and including last_key, PAGE per transaction."""
    while True:
        keys = [record.key for record in store.dump(None, PAGE) if record.key <= last_key]
        if not keys:
            return
        store.apply(Write(tuple(Delete(key) for key in keys)))


def lines(source: IO[bytes], bar: Any = None, copy: IO[bytes] | None = None) -> Iterator[bytes]:
    """Yield source's lines, counting their bytes on bar and writing them to copy if given."""
    bar = NoBar() if bar is None else bar  # not `or`: a tqdm without total has no truth value
    for line in source:
        if copy is not None:
            copy.write(line)
        bar.update(len(line))
        yield line


def spooled(source: IO[bytes]) -> tuple[IO[bytes], bool]:
    """Return (a file holding source's content that can be read again, whether it is a copy).

    A regular file is its own; a pipe is copied, as it is checked, into an
    unnamed temporary file (removed by the system when closed).
    """
    if source.seekable():
        return source, False
    return tempfile.TemporaryFile(prefix="kvapp-import-"), True


def check_input(source: IO[bytes], max_key_bytes: int, bar: Any = None) -> tuple[IO[bytes], int]:
    """Read the whole export file once; return (the file again, at its start, and its records).

    Raises exportformat.FormatError at the first bad line.  The caller closes
    the returned file if it is not source.
    """
    spool, copied = spooled(source)
    start = 0 if copied else source.tell()
    try:
        records = exportformat.read(lines(source, bar, spool if copied else None), max_key_bytes)
        count = sum(1 for _ in records)
        spool.flush()
        spool.seek(start)
    except BaseException:
        if copied:
            spool.close()
        raise
    return spool, count
