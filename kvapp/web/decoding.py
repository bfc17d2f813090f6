"""Strict application/x-www-form-urlencoded decoding of paths, queries and bodies.

The WHATWG URL standard (section 5.1) is the reference, with every lenient
corner turned into a 400: a malformed %-escape or bytes that are not UTF-8
are errors here, where urllib.parse would keep '%zz' or write U+FFFD.
"""

from __future__ import annotations

from string import hexdigits

from kvapp.store.base import InvalidInput, check_key, show
from kvapp.web.responses import BadRequest

_HEX_PAIRS = {
    (a + b).encode("ascii"): bytes([int(a + b, 16)]) for a in hexdigits for b in hexdigits
}


def unquote(data: bytes, plus: bool = True) -> bytes:
    """Return data with %XX escapes decoded; raise BadRequest on a bad escape.

    plus: '+' is a space, as in a form; in a URL path it stays a '+'.
    """
    if plus:
        data = data.replace(b"+", b" ")
    if b"%" not in data:
        return data
    parts = data.split(b"%")
    out = [parts[0]]
    for part in parts[1:]:
        byte = _HEX_PAIRS.get(part[:2])
        if byte is None:
            raise BadRequest("malformed percent-escape: '%' must be followed by two hex digits")
        out.append(byte)
        out.append(part[2:])
    return b"".join(out)


def utf8(data: bytes, what: str) -> str:
    """Return data decoded as UTF-8; raise BadRequest if it is not valid UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"{what} is not valid UTF-8 after percent-decoding") from None


def key_param(value: str, name: str, max_key_bytes: int) -> str:
    """Return a parameter that names a key or a key's start (prefix, after); 400 naming it."""
    try:
        return check_key(value, max_key_bytes)
    except InvalidInput as exc:
        raise BadRequest(f"{name}: {exc}") from None


def environ_bytes(text: str, what: str) -> bytes:
    """Return the bytes behind a WSGI 'bytes-as-latin-1' string (PEP 3333)."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        raise BadRequest(f"{what} holds characters that are not bytes") from None


def request_path(environ: dict) -> bytes:
    """Return the path of the request as bytes, percent-decoded strictly.

    waitress's PATH_INFO is already decoded, leniently: it keeps '%zz' as it
    is.  REQUEST_URI is the raw request-target (RFC 9112 section 3.2), so it
    is decoded again here, where a bad escape is a 400.  When REQUEST_URI is
    absent, or names another path (a server that rewrote it), the answer is
    SCRIPT_NAME + PATH_INFO.
    """
    path = environ_bytes(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""), "the path")
    uri = environ.get("REQUEST_URI")
    if uri is None:
        return path
    target = environ_bytes(uri, "the request target").partition(b"?")[0]
    if not target.startswith(b"/"):
        # absolute-form, http://host/path (RFC 9112 section 3.2.2)
        target = b"/" + target.partition(b"://")[2].partition(b"/")[2]
    # waitress folds leading slashes into one; do the same before comparing.
    decoded = b"/" + unquote(target, plus=False).lstrip(b"/")
    return decoded if decoded == path else path


def parse_pairs(data: bytes) -> list[tuple[str, bytes]]:
    """Return (name, raw value bytes) pairs of a urlencoded string, names decoded.

    Empty segments ('a=1&&b=2', a trailing '&') are skipped as in WHATWG;
    a segment without '=' is a BadRequest.  Values stay bytes so that callers
    decide how to decode and measure them.
    """
    pairs = []
    for segment in data.split(b"&"):
        if not segment:
            continue
        name, sep, value = segment.partition(b"=")
        if not sep:
            raise BadRequest("each pair must have the form key=value (a pair has no '=')")
        pairs.append((utf8(unquote(name), "a key"), unquote(value)))
    return pairs


def named_params(query: bytes, allowed: tuple[str, ...]) -> dict[str, bytes]:
    """Return a query's parameters by name; 400 for an unknown or repeated one."""
    params: dict[str, bytes] = {}
    for name, value in parse_pairs(query):
        if name not in allowed:
            takes = ", ".join(allowed) if allowed else "no parameters"
            raise BadRequest(f"unexpected parameter {show(name)}: this route takes {takes}")
        if name in params:
            raise BadRequest(f"give the {name} parameter at most once")
        params[name] = value
    return params
