"""The guard: which requests may reach a route at all.

kvapp.web.app calls Guard.check once per request, before routing.  It checks, in order:

1. Host, against DNS rebinding.  A page on evil.example can point its own name at
   127.0.0.1 and then read our answers as its own; the browser still sends
   `Host: evil.example`.  Only the names in allowed_hosts are served (any port).
   A missing, malformed or other Host is 400, as RFC 9112 section 3.2 asks.
2. The bearer token (RFC 6750), when auth_token is set: 401 without the right one.
   It comes before check 3 so that a client learns first what it lacks; a browser
   never attaches a bearer token by itself, so a cross-site request fails here too.
3. Cross-site writes (CSRF).  Browsers say where a request comes from in
   Sec-Fetch-Site (Fetch Metadata) and, on POST and cross-origin requests, Origin.
   A write marked cross-site or same-site, or whose Origin is not this server, is
   403.  curl sends neither header; a typed URL sends `Sec-Fetch-Site: none`.
   Browsers send Sec-Fetch-Site only to https:// and localhost URLs, and no Origin
   on an <img> GET, so a plain-http public name needs TLS or the token as well.

Reads stay open to other sites: every answer is text/plain with nosniff and a
sandbox CSP, so `<script src>` refuses to run it and `<img>` cannot decode it, and
without CORS headers fetch() only gets an opaque response.  Reading it needs DNS
rebinding, which check 1 stops.
"""

from __future__ import annotations

import hmac
import ipaddress

from kvapp.store.base import show
from kvapp.web.request import Request
from kvapp.web.responses import BadRequest, Forbidden, Unauthorized

# Exempt from the token so that a load balancer or systemd can probe it.
HEALTH_PATH = "/healthz"

# GET and HEAD on these only read (RFC 9110 section 9.2.1).  Every other request
# counts as a write, including GET /set and GET /delete and any route added later
# without being listed here: a new route is guarded until someone says it is a read.
# /healthz, /metrics, /openapi.json and /kv/ are the read routes of the API issue.
READ_METHODS = frozenset({"GET", "HEAD"})
READ_PATHS = frozenset({"/", "/get", "/healthz", "/metrics", "/openapi.json"})
READ_PREFIXES = ("/kv/",)

# Sec-Fetch-Site values of requests that did not come from another site's page:
# our own origin, or the user (typed URL, bookmark).  Unknown values are refused.
FETCH_SITES_ALLOWED = frozenset({"same-origin", "none"})

_CHALLENGE = 'Bearer realm="kvapp"'
_CHALLENGE_INVALID = 'Bearer realm="kvapp", error="invalid_token"'
_DEFAULT_PORTS = {"http": "80", "https": "443"}
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._")
_TOKEN_CHARS = _NAME_CHARS | frozenset("~+/")
# 253 for a DNS name, 1 for a trailing dot, 6 for ':65535'; an IPv6 literal is shorter.
_MAX_AUTHORITY = 260
# Host header values already found allowed, so that most requests skip parsing;
# bounded, so that made-up names (with allowed_hosts = *) cannot grow it.
_KNOWN_HOSTS = 64


def is_write(method: str, path: str) -> bool:
    """Return whether method on path may change state (everything but listed reads)."""
    return method not in READ_METHODS or not (path in READ_PATHS or path.startswith(READ_PREFIXES))


def _host_name(text: str) -> str | None:
    """Return a DNS name or IPv4 address lower-cased, without a trailing dot, or None."""
    if text.endswith("."):
        text = text[:-1]
    if not text or not text.isascii() or not _NAME_CHARS.issuperset(text):
        return None
    if text[0] == "." or text[-1] == "." or ".." in text:
        return None
    return text.lower()


def split_host(authority: str) -> tuple[str, str] | None:
    """Return (host, port) of a 'host[:port]' authority, or None if it is malformed.

    The host is lower-case without a trailing dot, or an IPv6 literal in brackets in
    compressed form ('[::1]'); the port is '' when absent, else its decimal digits.
    """
    if not authority or len(authority) > _MAX_AUTHORITY:
        return None
    if authority[0] == "[":
        # IP-literal, RFC 3986 section 3.2.2; no zone identifiers (RFC 6874).
        end = authority.find("]")
        literal = authority[1:end]
        if end < 0 or "%" in literal:
            return None
        try:
            host = f"[{ipaddress.IPv6Address(literal).compressed}]"
        except ValueError:
            return None
        rest = authority[end + 1 :]
    else:
        name, _, _ = authority.partition(":")
        rest = authority[len(name) :]
        named = _host_name(name)
        if named is None:
            return None
        host = named
    if not rest:
        return host, ""
    port = rest[1:]
    if rest[0] != ":" or not port.isascii() or not port.isdigit() or len(port) > 5:
        return None
    if int(port) > 65_535:
        return None
    return host, str(int(port))


def parse_allowed_hosts(text: str) -> tuple[str, ...]:
    """Return the allowed_hosts entries normalized; raise ValueError for a bad one.

    An entry is a host name or address without a port, '.example.com' for that name
    and all its subdomains (as in Django), or '*' for any host.
    """
    entries = []
    for entry in text.split():
        if entry == "*":
            entries.append(entry)
            continue
        if entry.startswith("*."):
            raise ValueError(f"{show(entry)}: write {entry[1:]} for that domain and its subdomains")
        subdomains = entry.startswith(".")
        if entry.count(":") > 1 and not entry.startswith("["):
            entry = f"[{entry}]"  # a bare IPv6 address such as ::1
        parsed = split_host(entry[1:] if subdomains else entry)
        if parsed is None or subdomains and parsed[0][0] == "[":
            raise ValueError(f"{show(entry)} is not a host name or address (use xn-- for IDNs)")
        if parsed[1]:
            raise ValueError(f"{show(entry)}: give hosts without a port; every port is allowed")
        entries.append("." + parsed[0] if subdomains else parsed[0])
    if not entries:
        raise ValueError("no host would be served; list host names, or * for any host")
    return tuple(entries)


def parse_token(text: str) -> str:
    """Return the auth token ('' for none); raise ValueError without echoing it."""
    token = text.strip()
    if not token:
        return ""
    # RFC 6750 section 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
    if not token.isascii() or not _TOKEN_CHARS.issuperset(token.rstrip("=")):
        raise ValueError("may hold only letters, digits and - . _ ~ + / (then = padding)")
    if len(token) < 16:
        raise ValueError("must be at least 16 characters; see secrets.token_urlsafe(32)")
    return token


class Guard:
    """The Host, token and cross-site checks, with their settings precomputed."""

    def __init__(self, allowed_hosts: tuple[str, ...], auth_token: str = "") -> None:
        self.any_host = "*" in allowed_hosts
        self.hosts = frozenset(entry for entry in allowed_hosts if entry[0] != ".")
        self.suffixes = tuple(entry for entry in allowed_hosts if entry[0] == ".")
        self.token = auth_token.encode("ascii") if auth_token else None
        self._known: dict[str, tuple[str, str]] = {}

    def check(self, request: Request) -> tuple[str, str]:
        """Return the request's allowed (host, port) if it may be routed.

        Raise BadRequest, Unauthorized or Forbidden otherwise.
        """
        environ = request.environ
        host, port = self.host(environ)
        if self.token is not None and request.path != HEALTH_PATH:
            self.authenticate(environ.get("HTTP_AUTHORIZATION"))
        # Only browsers send these headers, so curl never pays for is_write().
        fetch_site = environ.get("HTTP_SEC_FETCH_SITE")
        origin = environ.get("HTTP_ORIGIN")
        if (fetch_site is not None or origin is not None) and is_write(
            request.method, request.path
        ):
            if fetch_site is not None and fetch_site not in FETCH_SITES_ALLOWED:
                raise Forbidden(
                    "a write from another site is refused (Sec-Fetch-Site is not same-origin)"
                )
            scheme = environ.get("wsgi.url_scheme", "http")
            if origin is not None and not same_origin(origin, host, port, scheme):
                raise Forbidden(
                    "a write from another origin is refused (Origin does not name this server)"
                )
        return host, port

    def host(self, environ: dict) -> tuple[str, str]:
        """Return the request's (host, port) if it is allowed; else raise BadRequest."""
        raw = environ.get("HTTP_HOST")
        target = environ.get("REQUEST_URI", "/")
        if target[:1] not in ("/", "*"):
            # absolute-form: RFC 9112 section 3.2.2 says its authority replaces Host.
            _, _, rest = target.partition("://")
            raw = rest.split("/", 1)[0].split("?", 1)[0]
        else:
            known = self._known.get(raw)  # type: ignore[arg-type]
            if known is not None:
                return known
        if raw is None:
            raise BadRequest("the request has no Host header")
        parsed = split_host(raw)
        if parsed is None:
            raise BadRequest("the Host header is malformed; expected host[:port]")
        name = parsed[0]
        # '.example.com' covers example.com itself, hence the dot in front of name.
        if not (self.any_host or name in self.hosts or f".{name}".endswith(self.suffixes)):
            raise BadRequest(f"the host {show(name)} is not served here; see allowed_hosts")
        if len(self._known) < _KNOWN_HOSTS:
            self._known[raw] = parsed
        return parsed

    def authenticate(self, authorization: str | None) -> None:
        """Return if authorization carries the token; else raise Unauthorized (RFC 6750)."""
        scheme, _, credentials = (authorization or "").partition(" ")
        given = credentials.strip(" ").encode("latin-1", "replace")
        if scheme.lower() != "bearer" or not given:
            # No token, or another scheme: no error code (RFC 6750 section 3.1).
            raise Unauthorized(
                "this server needs a token: send Authorization: Bearer <token>", _CHALLENGE
            )
        assert self.token is not None
        if not hmac.compare_digest(given, self.token):
            raise Unauthorized("the bearer token is not valid", _CHALLENGE_INVALID)


def same_origin(origin: str, host: str, port: str, scheme: str = "http") -> bool:
    """Return whether an Origin header names host, and port too when the Host gave one.

    A proxy may drop the port from Host (nginx `proxy_set_header Host $host`), so
    ports are compared only when Host names one.  'null' and anything that is not
    one http(s) origin are not this server.  scheme is how the request came in
    (wsgi.url_scheme): 'https' only behind a trusted proxy that says so in
    X-Forwarded-Proto.  Then an http origin is refused: a page that anyone on the
    network path can forge.  An https origin of a plain-http request is accepted,
    because a TLS proxy that is not trusted_proxy looks like plain http too.
    """
    origin_scheme, sep, authority = origin.partition("://")
    default_port = _DEFAULT_PORTS.get(origin_scheme)
    if not sep or default_port is None:
        return False
    if scheme == "https" and origin_scheme != "https":
        return False
    parsed = split_host(authority)
    if parsed is None or parsed[0] != host:
        return False
    return not port or (parsed[1] or default_port) == port
