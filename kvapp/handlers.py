"""One small function per route: decode the request, call the repository, answer."""

from __future__ import annotations

from kvapp.config import Settings
from kvapp.decoding import check_key, parse_pairs, show, utf8
from kvapp.http import TEXT, BadRequest, NotFound, PayloadTooLarge, Response, text
from kvapp.repository import Repository
from kvapp.request import Request

USAGE = """\
kvapp: a durable key-value store over HTTP.

  curl 'localhost:4000/set?somekey=somevalue'      store one or more key=value pairs
  curl 'localhost:4000/get?key=somekey'            read a value back
  curl --data-urlencode 'big@file.txt' localhost:4000/set    store a large value (POST)

Keys and values are UTF-8 and percent-encoded as in an HTML form.
"""


class Handlers:
    """The route functions, bound to one repository and one Settings."""

    def __init__(self, repository: Repository, settings: Settings) -> None:
        self.repository = repository
        self.max_key_bytes = settings.max_key_bytes
        self.max_value_bytes = settings.max_value_bytes
        self.max_body_bytes = settings.max_body_bytes

    def index(self, request: Request) -> Response:
        """GET /: usage for a newcomer."""
        return text(USAGE)

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

    def get(self, request: Request) -> Response:
        """GET or HEAD /get?key=k: the stored value exactly, or 404."""
        pairs = parse_pairs(request.query)
        names = [name for name, _ in pairs]
        if not names:
            raise BadRequest("give the key to read: /get?key=NAME")
        for name in names:
            if name != "key":
                raise BadRequest(f"unexpected parameter {show(name)}: /get takes only key")
        if len(names) > 1:
            raise BadRequest("give the key parameter exactly once")
        key = check_key(utf8(pairs[0][1], "the key"), self.max_key_bytes)
        item = self.repository.get(key)
        if item is None:
            raise NotFound(f"no such key: {show(key)}")
        return Response(200, item.value, item.content_type)
