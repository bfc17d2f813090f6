"""Moving records: export to a file, import from one, copy between stores.

All three stream in constant memory, PAGE records at a time, in key order:
reads page through dump(after, PAGE), writes go through load(batch), one
bounded transaction per batch, so a live server sharing the database waits
for one batch at most, never for the whole run.

A run over a live store is not a point-in-time copy: each page is read when
its turn comes.  For one snapshot of a live SQLite database, take a backup
and export or copy the backup.

Revisions are ETags, and a key's ETag must never name two of its values
(RFC 9110 section 8.8.3).  Into a new file records keep their revisions.
Into an existing store a run first reserves as many revisions as the
source's highest (Store.reserve), and a record's revision r becomes
offset + r, offset being the store's revision when the run began:
- a store that no write has touched yet has offset 0, so records keep
  their revisions, and clients' ETags stay valid after a move;
- in a store with a history, no loaded value takes an ETag this store once
  gave another value, nor one that a client's write takes while the run
  goes on: those are above the reserved ones;
- a record whose revision is above the source's highest (written to a live
  source while copy ran) takes a revision reserved for its batch alone.
So the run's revisions are exactly the reserved ones.  Into an empty store,
a failed run deletes the keys that still carry one (what it loaded), and
leaves those a client wrote meanwhile; a new SQLite file appears only when
complete (kvapp.tools.targets.destination).  A record equal to the stored
row changes nothing (Store.load), so a run that failed part-way is finished
by running it again with --merge, and what it had loaded keeps its ETags.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from kvapp.store.base import Condition, ConditionFailed, Delete, Record, Write
from kvapp.tools import exportformat
from kvapp.tools.progress import NoBar
from kvapp.tools.targets import StoreError, Target

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


@dataclass
class Revisions:
    """The revisions a run gives its records in an existing store (see the module's docstring)."""

    offset: int  # the store's revision when the run began
    highest: int  # the source's highest revision: offset + 1 to offset + highest are the run's
    extra: set[int]  # one more per batch that holds a record above highest

    def mine(self, revision: int) -> bool:
        """Return True if revision is one this run gave a record."""
        return self.offset < revision <= self.offset + self.highest or revision in self.extra

    def renumbered(self, store: Any, batch: list[Record]) -> list[Record]:
        """Return batch with each record's revision moved into the run's own."""
        extra = 0
        if any(record.revision > self.highest for record in batch):
            extra = int(store.reserve(1)) + 1
            self.extra.add(extra)
        return [
            record._replace(revision=self.offset + record.revision)
            if record.revision <= self.highest
            else record._replace(revision=extra)
            for record in batch
        ]


def reserve(store: Any, highest: int) -> Revisions:
    """Reserve the revisions of a run that loads a source whose highest revision is highest.

    An empty source takes none: reserving moves the history floor, which
    would send watchers that are behind a 410 for a run that changed nothing.
    """
    revision = store.revision()
    # Past the export format's bound, an export of the store could not be
    # imported again.  (Each merge adds the source's highest revision.)
    if revision + highest > exportformat.MAX_REVISION:
        raise StoreError(
            f"the destination's revisions would pass {exportformat.MAX_REVISION}, the export"
            " format's bound: import into a new store instead"
        )
    if not highest:
        return Revisions(revision, 0, set())
    return Revisions(store.reserve(highest), highest, set())


def load(
    source: Iterable[Record],
    target: Target,
    tally: Tally,
    bar: Any = None,
    highest: int | None = None,
) -> int:
    """Load source's records, in key order, into target, PAGE per transaction; return how many.

    highest is the source's highest revision, needed unless target is a
    fresh file.  On any failure the exception goes on, and tally says what
    the target keeps: nothing from a fresh file (it is discarded) or an
    empty store (what was loaded is deleted again), else the records
    loaded so far.
    """
    bar = NoBar() if bar is None else bar  # not `or`: a tqdm without total has no truth value
    revisions = None
    if not target.fresh:
        if highest is None:
            raise ValueError("loading into an existing store needs the source's highest revision")
        revisions = reserve(target.store, highest)
    iterator = iter(source)
    # The last key of the batch being loaded: a load that failed may still
    # have committed (PostgreSQL's OutcomeUnknown, a lost answer to COMMIT).
    attempted: str | None = None
    try:
        while batch := list(itertools.islice(iterator, PAGE)):
            attempted = batch[-1].key
            if revisions is not None:
                batch = revisions.renumbered(target.store, batch)
            target.store.load(batch)
            tally.records += len(batch)
            tally.last_key = attempted
            bar.update(len(batch))
    except BaseException:
        if target.empty and attempted is not None:
            if revisions is not None:
                erase_loaded(target.store, attempted, revisions)
            tally.records, tally.last_key = 0, None
        raise
    return tally.records


def erase_loaded(store: Any, last_key: str, revisions: Revisions) -> None:
    """Delete the keys up to last_key that still carry one of the run's revisions.

    Each delete holds only while the key keeps that revision (If-Match): a
    client that writes one meanwhile keeps its write, and the page is read
    again.
    """
    after: str | None = None
    while True:
        page = store.dump(after, PAGE)
        loaded = [r for r in page if r.key <= last_key and revisions.mine(r.revision)]
        if loaded:
            deletes = (Delete(r.key, Condition(if_match=frozenset({r.revision}))) for r in loaded)
            try:
                store.apply(Write(tuple(deletes)))
            except ConditionFailed:
                continue  # read the page again: the key a client wrote keeps its write
        if len(page) < PAGE or page[-1].key >= last_key:
            return
        after = page[-1].key


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


def check_input(
    source: IO[bytes], max_key_bytes: int, bar: Any = None
) -> tuple[IO[bytes], int, int]:
    """Read the whole export file once; return the file again, at its start, its records' count
    and their highest revision.

    Raises exportformat.FormatError at the first bad line.  The caller closes
    the returned file if it is not source.
    """
    spool, copied = spooled(source)
    start = 0 if copied else source.tell()
    try:
        records = exportformat.read(lines(source, bar, spool if copied else None), max_key_bytes)
        count = highest = 0
        for record in records:
            count += 1
            highest = max(highest, record.revision)
        spool.flush()
        spool.seek(start)
    except BaseException:
        if copied:
            spool.close()
        raise
    return spool, count, highest
