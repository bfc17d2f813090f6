"""Entity tags: the ETag of a stored version, and the If-Match / If-None-Match lists.

A version's ETag is its revision in quotes, "42": meta.revision grows by one
on every write and is stored with the key, so the tag is strong (one tag, one
exact value and Content-Type), changes on every write of the key and survives
restarts (RFC 9110 section 8.8.3).
"""

from __future__ import annotations

import re

from kvapp.store.base import ANY, Condition, Tag, show
from kvapp.web.request import header_text
from kvapp.web.responses import BadRequest

# entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE; etagc = %x21 / %x23-7E / obs-text
# (RFC 9110 section 8.8.3); WSGI hands obs-text over as latin-1 characters.
# One element of a #entity-tag list with the OWS and the comma after it;
# empty elements are allowed (RFC 9110 section 5.6.1).  etagc includes ",",
# so the list is read tag by tag, never split at commas.
# Possessive: a run of spaces before a bad character was otherwise split every
# way between the two OWS (64 KiB of them: 32 s of one worker's GIL).
_ELEMENT = re.compile(r'[ \t]*+(?:(W/)?"([\x21\x23-\x7e\x80-\xff]*+)")?[ \t]*+(,|\Z)')


def etag(revision: int) -> str:
    """Return the ETag header value of the version written at revision."""
    return f'"{revision}"'


def parse_tags(value: str, strong: bool, header: str) -> Tag:
    """Return ANY or the revisions that an If-Match / If-None-Match value names.

    strong: If-Match compares strongly, so weak tags never match; If-None-Match
    compares weakly, so W/"42" matches "42" (RFC 9110 section 8.8.3.2).  Tags
    that kvapp never sends ("x", "007") match nothing.  A value that is not
    * or a list of entity tags (If-Match: 42 without quotes, or tags amid
    other text) is a 400 naming header: which of its tags the client meant
    is a guess, and a condition must never be guessed.
    """
    if value.strip(" \t") == "*":
        return ANY
    revisions = set()
    position = 0
    while True:  # each element ends in a comma, which moves on, or at the end
        element = _ELEMENT.match(value, position)
        if element is None:
            raise BadRequest(
                f'{header} must be * or a list of entity tags such as "42",'
                f" not {show(header_text(value))}"
            )
        weak, opaque, comma = element.groups()
        position = element.end()
        if opaque is not None and not (weak and strong):
            revision = revision_of(f'"{opaque}"')
            if revision is not None:
                revisions.add(revision)
        if not comma:
            break
    return frozenset(revisions)


def condition(environ: dict) -> Condition | None:
    """Return the Condition that a write request's If-Match and If-None-Match state, or None."""
    if_match = environ.get("HTTP_IF_MATCH")
    if_none_match = environ.get("HTTP_IF_NONE_MATCH")
    if if_match is None and if_none_match is None:
        return None
    return Condition(
        None if if_match is None else parse_tags(if_match, True, "If-Match"),
        None if if_none_match is None else parse_tags(if_none_match, False, "If-None-Match"),
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
