"""The store contract: what every backend keeps, and the values that cross it.

A backend (kvapp.store.sqlite, kvapp.store.postgres) implements Store.  The
web edge and the data tools hold a Store and nothing more specific, so a
new backend is one new module that keeps these promises:

- Every change to the store is one Write: Put and Delete changes of
  distinct keys, each with an optional Condition on the key's current
  version.  A Write is applied all or nothing, in one transaction.
- apply_batch applies many Writes in one transaction and one commit (group
  commit, kvapp.store.groupcommit) and still gives each its own result: a
  Write whose condition fails changes nothing and fails alone.  The rules
  that decide each result live in one pure function, kvapp.store.plan.plan;
  a backend reads the rows a batch touches, calls it, and writes what it
  returns.
- Revisions: one counter per store; every applied Write that changes
  something takes the next one, and each key it puts carries it as its
  ETag.  A revision is never reused, even across dump and load.
- Durable: apply and apply_batch return only once the commit is on disk
  (or, for PostgreSQL, acknowledged by the server's WAL flush).
- Errors: StorageError and its subclasses, whose messages are one line a
  client may read.  StorageFull maps to 507, the others to 503; the web edge
  alone does that mapping.  DatabaseUnusable is raised at startup only.
- Keys are text whose UTF-8 order is their listing order; check_key holds
  the rule for what a key may be.
- The change log: every change a Write (or the sweeper's removal of
  expired keys) makes is one Event, stored in the same transaction as the
  data, so an event exists exactly when its change is committed.  history()
  reads it back in (revision, n) order; a backend keeps the changes after
  its history floor and removes older ones only through trim_history().
  Its feed (kvapp.store.feed) wakes the watchers of this process after a
  commit in any process.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from kvapp.store.feed import Feed

ANY = "*"
"""A Condition tag that matches any current version (If-Match: * / If-None-Match: *)."""

Tag = frozenset[int] | str
"""ANY, or the set of revisions an If-Match / If-None-Match header named."""


class Condition(NamedTuple):
    """What the key's current live version must be for a change to apply (RFC 9110 13.1).

    revision is None when the key is absent or expired.
    """

    if_match: Tag | None = None
    if_none_match: Tag | None = None

    def holds(self, revision: int | None) -> bool:
        """Return True if a key whose live version is revision satisfies this condition."""
        if self.if_match is not None:
            if revision is None:
                return False
            if self.if_match != ANY and revision not in self.if_match:
                return False
        if self.if_none_match is not None and revision is not None:
            if self.if_none_match == ANY or revision in self.if_none_match:
                return False
        return True


class Put(NamedTuple):
    """Store value under key; ttl in seconds, or None to keep it until changed."""

    key: str
    value: bytes
    content_type: str
    ttl: int | None = None
    condition: Condition | None = None


class Delete(NamedTuple):
    """Remove key; a Delete of an absent key changes nothing, whatever its condition."""

    key: str
    condition: Condition | None = None


Change = Put | Delete


class Check(NamedTuple):
    """A condition on a key's live version, which the Write need not change."""

    key: str
    condition: Condition


class Write(NamedTuple):
    """Changes of distinct keys, applied together or not at all.

    A transaction adds checks, reads and otherwise: when every check holds,
    the Write makes its changes and answers its reads; when one does not,
    otherwise (changes and reads only) does instead, or nothing, and the
    Outcome says succeeded=False.  Checks and reads see the state before the
    Write's own changes: one snapshot, the one its changes replace.  The
    values its reads answer may add up to read_limit bytes at most; past it,
    the Write fails alone with ReadsTooLarge, having changed nothing.
    """

    changes: tuple[Change, ...]
    reads: tuple[str, ...] = ()
    checks: tuple[Check, ...] = ()
    otherwise: Write | None = None
    read_limit: int | None = None

    @classmethod
    def of(cls, *changes: Change) -> Write:
        return cls(tuple(changes))

    def branches(self) -> tuple[Write, ...]:
        """Return the Write and its otherwise, if it has one."""
        return (self,) if self.otherwise is None else (self, self.otherwise)

    def keys(self) -> list[str]:
        """Return every key the Write may touch, checked, read or changed, once each."""
        if self.otherwise is None and not self.checks and not self.reads:
            return [change.key for change in self.changes]  # every write but a transaction
        keys = [check.key for check in self.checks]
        for branch in self.branches():
            keys += [change.key for change in branch.changes]
            keys += branch.reads
        return list(dict.fromkeys(keys))

    def read_keys(self) -> tuple[str, ...]:
        """Return the keys whose values the Write or its otherwise reads."""
        return self.reads if self.otherwise is None else self.reads + self.otherwise.reads


class Outcome(NamedTuple):
    """What an applied Write did.

    revision: the revision the Write's puts carry (their ETag), or the store's
    current revision when it changed nothing.  existed: for each change, whether
    its key had a live value before.  succeeded: whether its checks held (and
    so its own changes, not its otherwise's, were made).  items: for each
    read of the branch taken, the live Item before the Write, or None.
    """

    revision: int
    existed: tuple[bool, ...]
    succeeded: bool = True
    items: tuple[Item | None, ...] = ()


class ConditionFailed(Exception):
    """A change's Condition did not hold; nothing of its Write was applied."""

    def __init__(self, key: str) -> None:
        super().__init__("the condition on the key's current version does not hold")
        self.key = key


class Record(NamedTuple):
    """One stored key as the data tools move it between stores: dump() gives, load() takes.

    revision is the key's ETag; expires_at is in unix milliseconds, or None
    for a key that never expires.
    """

    key: str
    value: bytes
    content_type: str
    revision: int
    expires_at: int | None


class Item(NamedTuple):
    """A live value as get() returns it; revision is its ETag."""

    value: bytes
    content_type: str
    revision: int


class ReadsTooLarge(Exception):
    """A Write's reads would answer more than its read_limit; nothing of it was applied."""

    def __init__(self, total: int, limit: int) -> None:
        super().__init__(
            f"the gets of this transaction would answer {total} bytes of values;"
            f" the limit is {limit}"
        )


Result = Outcome | ConditionFailed | ReadsTooLarge
"""What apply_batch gives for one Write: its Outcome, or the error that skipped it."""


PUT, DELETE, EXPIRED = "put", "delete", "expired"
"""Event kinds: a value stored; a key deleted by a client; a key removed after its deadline."""

WHOLE = 2**62
"""An Event n above any real one: the position (R, WHOLE) is after all of revision R."""


class Event(NamedTuple):
    """One committed change of one key in the change log.

    The changes of one revision are numbered n = 0, 1, ... in the order of
    the Write's changes.  A put carries the value, its content type and its
    deadline (unix milliseconds, or None); a delete or expiry carries None.
    """

    revision: int
    n: int
    key: str
    kind: str
    value: bytes | None = None
    content_type: str | None = None
    expires_at: int | None = None


# The bytes of values a page of the change log holds at most, but for its
# last event (Store.history): a watcher far behind, or one whose client hung
# up, holds no more than this and its encoding (at most 6 bytes per byte, a
# JSON \u escape) at a time.
PAGE_BYTES = 1024 * 1024


class History(NamedTuple):
    """Events read from one snapshot of the change log.

    revision: the store's revision at that snapshot; every change up to it
    is either in events or later than the page asked for.  floor: the
    revision up to which changes may have been removed: a position at or
    after floor can be resumed from without a gap.
    """

    revision: int
    floor: int
    events: list[Event]
    # The page ended at its limit of events or of bytes: more may follow it.
    cut: bool = False


class StorageError(Exception):
    """The database could not serve a request; the message is one line."""


class StorageFull(StorageError):
    """The disk or the database's size limit is full; nothing of the write was stored."""


class StorageBusy(StorageError):
    """Another connection held the lock past the busy timeout; retry."""


class StorageUnavailable(StorageError):
    """The database cannot be written or read now: read-only, unreachable, I/O error, damaged."""


# How every OutcomeUnknown ends: the client cannot tell from the answer.
MAY_BE_STORED = "the write may or may not be stored; retry"
# What a write's error adds when none of it was stored; a read's says nothing of storing.
NOTHING_STORED = ": nothing was stored"


# What a store answers once close() has run (a request or thread that outlived
# the server's stop): it opens no new connection, which would recreate files
# and sessions that nothing closes.
CLOSED = "the store is closed: the server is stopping; retry"


class OutcomeUnknown(StorageUnavailable):
    """A write's commit went out and its answer never came: it may or may not be stored.

    The client must read the keys again, or retry a write that is safe to
    repeat.  (With PostgreSQL, a commit whose answer was lost or never came;
    with either backend, a write that stopped waiting for a stalled batch.)
    """


def gave_up(why: str, in_batch: bool) -> StorageError:
    """Return the error of a write that stopped waiting for a stalled batch (groupcommit).

    A write in the batch may yet be stored; one queued behind it is not.
    """
    if in_batch:
        return OutcomeUnknown(f"{why}: {MAY_BE_STORED}")
    return StorageUnavailable(f"{why}: nothing was stored; retry")


class DatabaseUnusable(Exception):
    """At startup: the database cannot serve as kvapp's store; the message says what to do."""


class InvalidInput(ValueError):
    """A key or content type that breaks the store's rules; the message says which rule."""


# C0 controls, DEL and C1 controls: never part of a key (they break logs,
# terminals and line-based listings).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# The longest content type stored with a value, in printable ASCII characters.
MAX_CONTENT_TYPE = 255
# The content type of a value given without one (RFC 9110 section 8.3).
OCTET_STREAM = "application/octet-stream"
# The longest TTL in seconds: 68 years, and a signed 32-bit count as Redis's EXPIRE takes.
MAX_TTL_SECONDS = 2**31 - 1

# media-type = type "/" subtype *( OWS ";" OWS [ name "=" ( token / quoted-string ) ] ),
# in printable ASCII (RFC 9110 sections 8.3.1, 5.6.4 and 5.6.6), and nothing
# else: "text/plain; a=b, text/html" is a list that a browser reads as
# text/html (the Fetch standard's MIME type extraction takes the last).
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[\t \x21\x23-\x5b\x5d-\x7e]|\\[\t\x20-\x7e])*"'
# OWS is spaces and tabs only: Python's \s would also let CR, LF, NEL and
# U+3000 into a Content-Type header that every later read sends.  The
# quantifiers are possessive: the OWS after one ";" and before the next are
# both optional, and a failing match of 255 characters otherwise tried every
# split of each run between them (measured: 1 s at 57 characters, doubling
# with each "; ").
MEDIA_TYPE = re.compile(
    rf"{_TOKEN}/{_TOKEN}(?:[ \t]*+;[ \t]*+(?:{_TOKEN}=(?:{_TOKEN}|{_QUOTED}))?)*+"
)


def show(text: str, limit: int = 40) -> str:
    """Return text as a short quoted one-line excerpt for an error message."""
    if len(text) > limit:
        return repr(text[:limit]) + "..."
    return repr(text)


def check_key(key: str, max_key_bytes: int) -> str:
    """Return key if it is a valid key; raise InvalidInput saying why not."""
    if not key:
        raise InvalidInput("the key is empty")
    if key.isascii() and key.isprintable():  # the common case: no control character
        size = len(key)
    elif _CONTROL.search(key):
        raise InvalidInput(f"the key {show(key)} contains a control character")
    else:
        try:
            size = len(key.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidInput("the key holds a lone surrogate escape") from None
    if size > max_key_bytes:
        raise InvalidInput(
            f"the key is {size} bytes long; the limit is {max_key_bytes} bytes of UTF-8"
        )
    return key


def check_content_type(content_type: str) -> str:
    """Return content_type if it may be stored with a value; raise InvalidInput saying why not."""
    if len(content_type) > MAX_CONTENT_TYPE or not MEDIA_TYPE.fullmatch(content_type):
        raise InvalidInput(
            f"the content type must be a media type such as text/plain, at most"
            f" {MAX_CONTENT_TYPE} printable ASCII characters"
        )
    return content_type


def check_ttl(seconds: int) -> int:
    """Return seconds if it is a TTL a value may have; raise InvalidInput saying why not."""
    if not 1 <= seconds <= MAX_TTL_SECONDS:
        raise InvalidInput(f"a ttl is a whole number of seconds from 1 to {MAX_TTL_SECONDS}")
    return seconds


def successor(prefix: str) -> str | None:
    """Return the least string above every string that starts with prefix, or None if none is.

    UTF-8 byte order is code point order, so bumping the last code point that
    can be bumped gives the exclusive upper bound of a prefix range.
    """
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        if last < 0x10FFFF:
            # Surrogates cannot be stored as UTF-8; the next code point above them is U+E000.
            chars.append(chr(0xE000 if 0xD800 <= last + 1 <= 0xDFFF else last + 1))
            return "".join(chars)
    return None


def key_range(prefix: str, after: str | None) -> tuple[str, str, str | None]:
    """Return (operator, lower bound, exclusive upper bound or None) of a listing's key range.

    Every backend lists with `key <operator> lower AND key < upper`: one range
    scan of the primary key's index, never a full scan.
    """
    if after is not None and after >= prefix:
        return ">", after, successor(prefix)
    return ">=", prefix, successor(prefix)


class Listing(NamedTuple):
    """Keys of a listing, and the store's revision at the snapshot they were read from.

    A client that lists keys, then watches changes from revision on, misses
    none and sees none twice (etcd's "list, then watch" pattern).
    """

    revision: int
    keys: list[str]


class Store(Protocol):
    """A key-value store as the web edge, the sweeper and the data tools use it.

    path names the store in messages and logs (a URL's password redacted).
    Every method may raise StorageError unless it says otherwise.
    """

    path: str
    synchronous: str
    on_commit: Callable[[int], None]
    """Called after every commit of apply_batch with the number of Writes it held."""
    feed: Feed
    """Wakes this process's watchers after any process commits (kvapp.store.feed)."""

    def get(self, key: str) -> Item | None:
        """Return the live item stored under key, or None; an expired key is None."""
        ...

    def list_keys(self, prefix: str, after: str | None, limit: int) -> Listing:
        """Return up to limit live keys that start with prefix and sort above after.

        In UTF-8 byte order, from one range scan (key_range), with the store's
        revision read from the same snapshot.
        """
        ...

    def apply(self, write: Write) -> Outcome:
        """Apply one Write, all or nothing, through group commit; return once it is durable.

        Raises ConditionFailed (nothing of the Write stored) or the
        StorageError that failed its batch (nothing of the batch stored).
        """
        ...

    def apply_batch(self, writes: Sequence[Write]) -> list[Result]:
        """Apply writes in one transaction and one commit; return each one's Result, in order.

        A StorageError fails the whole batch and stores nothing of it.
        """
        ...

    def set_many(self, items: list[tuple[str, bytes, str]]) -> int:
        """Store (key, value, content_type) items as one Write; return its revision."""
        ...

    def purge_expired(self, limit: int = 500) -> int:
        """Delete up to limit expired rows in one short transaction; return how many.

        The removal takes one revision, and each key removed is an EXPIRED Event of it.
        """
        ...

    def history(
        self, after: tuple[int, int], prefix: str, limit: int, max_bytes: int = PAGE_BYTES
    ) -> History:
        """Return up to limit Events after the position (revision, n) whose keys start with prefix.

        In (revision, n) order, from one snapshot that also gives the store's
        revision and history floor.  The page also ends after the event that
        takes its values to max_bytes (always at least one event): values
        are up to max_value_bytes (1 MiB by default) each, and a page of
        1,000 of them must not be read into memory at once.
        """
        ...

    def trim_history(self, max_age_seconds: int, keep: int, limit: int = 500) -> int:
        """Remove the oldest revisions' Events: older than max_age_seconds, or past the newest keep.

        Whole revisions at a time, at most about limit Events per
        transaction, found through the change log's primary key; the history
        floor rises to the last revision removed.  Return how many Events
        were removed.
        """
        ...

    def stats(self) -> tuple[int, int]:
        """Return (number of live keys, bytes the store takes on disk)."""
        ...

    def check_health(self) -> None:
        """Return if the store answers a read and would accept a write; else StorageError.

        Writes nothing.
        """
        ...

    def dump(self, after: str | None, limit: int) -> list[Record]:
        """Return up to limit live records whose keys sort above after, in UTF-8 byte order."""
        ...

    def revision(self) -> int:
        """Return the store's revision: the highest one a write or a load has used."""
        ...

    def reserve(self, count: int) -> int:
        """Take the next count revisions for a load; return the revision before them.

        No write gets them: the revision counter passes them, and with it the
        history floor (a watcher from before must list the keys again, 410).
        """
        ...

    def load(self, records: list[Record]) -> None:
        """Insert or replace records, revisions included, in one transaction.

        A record equal to the stored row (value, content type, expiry) leaves
        that row and its ETag as they are.  The revision counter rises to the
        highest revision loaded, so no later write reuses an ETag that a
        loaded key carries.  A load is not in the change log: the history
        floor rises to the revision after it, so a watcher from before it
        must list the keys again (410).  Which revisions records may carry
        without reusing an ETag is the caller's to choose (reserve()).
        """
        ...

    def close(self) -> None:
        """Close every connection this store opened in this process."""
        ...
