"""One small function per route: decode the request, call the repository, answer."""

from __future__ import annotations

from kvapp.config import Settings
from kvapp.store.base import Delete, Store, Write, check_key, show
from kvapp.web.decoding import parse_pairs, utf8
from kvapp.web.etags import etag
from kvapp.web.kv_routes import read_conditions
from kvapp.web.request import Request
from kvapp.web.responses import TEXT, BadRequest, NotFound, PayloadTooLarge, Response, text

USAGE = """\
kvapp: a durable key-value store over HTTP.

  curl '{server}/set?somekey=somevalue'      store one or more key=value pairs
  curl '{server}/get?key=somekey'            read a value back
  curl '{server}/delete?key=somekey'         delete a key
  curl --data-urlencode 'big@file.txt' {server}/set    store a large value (POST)

Keys and values are UTF-8 and percent-encoded as in an HTML form.

Each key is also a resource, for any bytes and with ETags and TTLs:

  curl -X PUT --data-binary @photo.jpg -H 'Content-Type: image/jpeg' {server}/kv/photo
  curl {server}/kv/photo          curl -X DELETE {server}/kv/photo
  curl '{server}/kv/?prefix=ph'   list keys

The whole API: {server}/openapi.json
"""


class Handlers:
    """The route functions, bound to one repository and one Settings."""

    def __init__(self, repository: Store, settings: Settings) -> None:
        self.repository = repository
        self.max_key_bytes = settings.max_key_bytes
        self.max_value_bytes = settings.max_value_bytes
        self.max_body_bytes = settings.max_body_bytes
        # Where the run command listens, for a request the guard has not seen.
        self.host = f"[{settings.host}]" if ":" in settings.host else settings.host
        self.port = str(settings.port)

    def index(self, request: Request) -> Response:
        """GET /: usage for a newcomer, with the host and port the client used."""
        if request.host is not None:
            # The guard's normalized Host: a name of letters, digits, '-', '.'
            # and '_', or an IPv6 literal, and a port of digits.  Nothing else
            # from the request reaches the text.
            host, port = request.host
        else:
            host, port = self.host, self.port
        return text(USAGE.format(server=f"{host}:{port}" if port else host))

    def set(self, request: Request) -> Response:
        """GET or POST /set: store every pair of the query and form body in one write."""
        pairs = parse_pairs(request.query)
        if request.method == "POST":
            pairs += parse_pairs(request.form(self.max_body_bytes))
        if not pairs:
            raise BadRequest("nothing to store: give at least one pair, e.g. /set?name=value")
        seen: set[str] = set()
        items = []
        for key, value in pairs:
            check_key(key, self.max_key_bytes)
            if key in seen:
                raise BadRequest(f"the key {show(key)} is given more than once")
            seen.add(key)
            if len(value) > self.max_value_bytes:
                raise PayloadTooLarge(
                    f"the value of {show(key)} is {len(value)} bytes;"
                    f" the limit is {self.max_value_bytes}"
                )
            utf8(value, "a value")
            items.append((key, value, TEXT))
        self.repository.set_many(items)
        count = len(items)
        return text(f"stored {count} key{'' if count == 1 else 's'}")

    def _key(self, pairs: list[tuple[str, bytes]], route: str, verb: str) -> str:
        """Return the one key parameter of pairs; 400 unless there is exactly one."""
        if len(pairs) == 1 and pairs[0][0] == "key":
            return check_key(utf8(pairs[0][1], "the key"), self.max_key_bytes)
        names = [name for name, _ in pairs]
        if not names:
            raise BadRequest(f"give the key to {verb}: {route}?key=NAME")
        for name in names:
            if name != "key":
                raise BadRequest(f"unexpected parameter {show(name)}: {route} takes only key")
        if len(names) > 1:
            raise BadRequest("give the key parameter exactly once")
        return check_key(utf8(pairs[0][1], "the key"), self.max_key_bytes)

    def get(self, request: Request) -> Response:
        """GET or HEAD /get?key=k: the stored value and its Content-Type exactly; 304; 404."""
        key = self._key(parse_pairs(request.query), "/get", "read")
        item = self.repository.get(key)
        if item is None:
            raise NotFound(f"no such key: {show(key)}")
        headers = [("ETag", etag(item.revision))]
        not_modified = read_conditions(request, item.revision, headers)
        if not_modified is not None:
            return not_modified
        return Response(200, item.value, item.content_type, headers)

    def delete(self, request: Request) -> Response:
        """GET or POST /delete?key=k (or a form body on POST): 200 when deleted, 404 when absent."""
        pairs = parse_pairs(request.query)
        if request.method == "POST":
            pairs += parse_pairs(request.form(self.max_body_bytes))
        key = self._key(pairs, "/delete", "delete")
        if not self.repository.apply(Write.of(Delete(key))).existed[0]:
            raise NotFound(f"no such key: {show(key)}")
        return text("deleted 1 key")
