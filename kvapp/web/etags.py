"""Entity tags: the ETag of a stored version, and the If-Match / If-None-Match lists.

A version's ETag is its revision in quotes, "42": meta.revision grows by one
on every write and is stored with the key, so the tag is strong (one tag, one
exact value and Content-Type), changes on every write of the key and survives
restarts (RFC 9110 section 8.8.3).
"""

from __future__ import annotations

import re

from kvapp.store.base import ANY, Condition, Tag

# entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE; etagc = %x21 / %x23-7E / obs-text
# (RFC 9110 section 8.8.3); WSGI hands obs-text over as latin-1 characters.
_ENTITY_TAG = re.compile(r'(W/)?"([\x21\x23-\x7e\x80-\xff]*)"')


def etag(revision: int) -> str:
    """Return the ETag header value of the version written at revision."""
    return f'"{revision}"'


def parse_tags(value: str, strong: bool) -> Tag:
    """Return ANY or the revisions that an If-Match / If-None-Match value names.

    strong: If-Match compares strongly, so weak tags never match; If-None-Match
    compares weakly, so W/"42" matches "42" (RFC 9110 section 8.8.3.2).  Tags
    that kvapp never sends, and anything that is not an entity tag (If-Match: 42
    without quotes), match nothing: a malformed If-Match gets 412 and cannot
    turn a conditional write into an unconditional one.
    """
    if value.strip(" \t") == "*":
        return ANY
    revisions = set()
    for weak, opaque in _ENTITY_TAG.findall(value):
        if weak and strong:
            continue
        revision = revision_of(f'"{opaque}"')
        if revision is not None:
            revisions.add(revision)
    return frozenset(revisions)


def condition(environ: dict) -> Condition | None:
    """Return the Condition that a write request's If-Match and If-None-Match state, or None."""
    if_match = environ.get("HTTP_IF_MATCH")
    if_none_match = environ.get("HTTP_IF_NONE_MATCH")
    if if_match is None and if_none_match is None:
        return None
    return Condition(
        None if if_match is None else parse_tags(if_match, strong=True),
        None if if_none_match is None else parse_tags(if_none_match, strong=False),
    )


def revision_of(tag: str) -> int | None:
    """Return the revision of an ETag exactly as kvapp sends it ("42"), or None for other text.

    Only the canonical form of a revision is a tag kvapp sent: "007" is not "7".
    """
    opaque = tag[1:-1]
    if len(tag) < 3 or tag[0] != '"' or tag[-1] != '"' or len(opaque) >= 20:
        return None
    if not (opaque.isascii() and opaque.isdigit()) or opaque != str(int(opaque)):
        return None
    return int(opaque)
