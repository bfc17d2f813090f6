"""Writes as values: what one request asks the repository to change, and what came of it.

Every change to the store, from /set, PUT, DELETE or /delete, is one Write:
a tuple of Put and Delete changes of distinct keys, each with an optional
Condition on the key's current version.  The repository applies a Write all
or nothing, in one transaction, and can apply many Writes in one transaction
(group commit) while still giving each its own Outcome: a Write whose
condition fails changes nothing and fails alone, because every condition of
a Write is checked before any of its changes is made.
"""

from __future__ import annotations

from typing import NamedTuple

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


class Write(NamedTuple):
    """Changes of distinct keys, applied together or not at all."""

    changes: tuple[Change, ...]

    @classmethod
    def of(cls, *changes: Change) -> Write:
        return cls(tuple(changes))


class Outcome(NamedTuple):
    """What an applied Write did.

    revision: the revision the Write's puts carry (their ETag), or the store's
    current revision when it changed nothing.  existed: for each change, whether
    its key had a live value before.
    """

    revision: int
    existed: tuple[bool, ...]


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
