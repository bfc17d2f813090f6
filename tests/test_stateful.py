"""A rule-based state machine: the store, driven through the WSGI app, equals a dict.

Keys and values are drawn to include the characters that form encoding makes
hard ('+ & = % ; #', spaces, newlines, non-ASCII, empty values), and each is
sent in one of several legal encodings.  Invalid requests must change nothing,
and closing and reopening the app on the same file must lose nothing.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT
from hypothesis import note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from kvapp import create_app
from kvapp.config import load_config

# Each example opens a new database and commits with fsync; on tmpfs an fsync
# costs nothing, so examples (and shrinking a failure) run at CPU speed.
FAST_TMP = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
MAX_KEY_BYTES = 32
MAX_VALUE_BYTES = 64
FORM = "application/x-www-form-urlencoded"

HARD = "+&=%;# ?/\\'\"\n\r\t"
# Keys: no control characters (C0, DEL, C1: category Cc) and no surrogates.
key_chars = st.one_of(
    st.sampled_from(HARD.replace("\n", "").replace("\r", "").replace("\t", "")),
    st.sampled_from("aé€😀"),
    st.characters(exclude_categories=("Cc", "Cs")),
)
keys = st.text(key_chars, min_size=1, max_size=8).filter(
    lambda key: len(key.encode("utf-8")) <= MAX_KEY_BYTES
)
# Keys of exactly MAX_KEY_BYTES bytes, ending in a one- or two-byte character.
keys_at_limit = st.sampled_from("abé+%&").map(lambda c: "k" * (MAX_KEY_BYTES - len(c.encode())) + c)
# Values: anything but surrogates, control characters and newlines included.
value_chars = st.one_of(
    st.sampled_from(HARD), st.sampled_from("\x00é€😀"), st.characters(exclude_categories=("Cs",))
)
values = st.one_of(
    st.just(""),
    st.text(value_chars, max_size=16),  # at most 64 bytes of UTF-8
    st.sampled_from("x€").map(lambda c: c * (MAX_VALUE_BYTES // len(c.encode()))),
)

# Each byte of UTF-8 may be sent percent-encoded (upper or lower case hex) or,
# where form encoding allows it, as itself; a space also as '+'.
SPECIAL = frozenset(b"%&=+#")


@st.composite
def encoded(draw, text: str) -> bytes:
    """Return one legal application/x-www-form-urlencoded spelling of text."""
    style = draw(st.sampled_from(["upper", "lower", "raw", "mixed"]))
    # "mixed" picks per byte from a seeded generator: one draw instead of one
    # per byte keeps examples small, and shrinking fast.
    mix = random.Random(draw(st.integers(0, 2**16)))
    out = bytearray()
    for byte in text.encode("utf-8"):
        choice = style if style != "mixed" else mix.choice(["upper", "lower", "raw"])
        if byte == 0x20 and choice != "upper":
            out += b"+"
        elif choice == "raw" and byte not in SPECIAL and byte > 0x20:
            out.append(byte)
        else:
            out += (b"%%%02X" if choice == "upper" else b"%%%02x") % byte
    return bytes(out)


# Fragments that make a whole /set request invalid; each names its status.
INVALID = [
    (b"noequals", 400),
    (b"=value", 400),  # empty key
    (b"%zz=1", 400),
    (b"k%4=1", 400),
    (b"k=%", 400),
    (b"%ff=1", 400),
    (b"k=%c3%28", 400),  # not UTF-8
    (b"%01=x", 400),  # control character in the key
    (b"k%7F=x", 400),
    (b"k%C2%85=x", 400),  # C1 control (NEL)
    (b"k" * (MAX_KEY_BYTES + 1) + b"=x", 400),
    (b"big=" + b"x" * (MAX_VALUE_BYTES + 1), 413),
    (b"big=" + b"%E2%82%AC" * (MAX_VALUE_BYTES // 3 + 1), 413),
]


class KeyValueMachine(RuleBasedStateMachine):
    """kvapp through its WSGI interface against a plain dict."""

    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="kvapp-stateful-", dir=FAST_TMP))
        self.settings = load_config(
            ROOT / "config.ini",
            environ={},
            database=str(self.folder / "kv.sqlite3"),
            max_key_bytes=MAX_KEY_BYTES,
            max_value_bytes=MAX_VALUE_BYTES,
        )
        self.app = create_app(self.settings)
        self.model: dict[str, str] = {}
        # Every valid key a request named, stored or not: each is checked after every step.
        self.seen: set[str] = set()

    def teardown(self) -> None:
        self.app.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- talking to the app ----------------------------------------------------

    def request(
        self, method: str, path: str, query: bytes = b"", body: bytes = b"", content_type=FORM
    ) -> tuple[int, bytes]:
        environ: dict[str, Any] = {
            "REQUEST_METHOD": method,
            "SCRIPT_NAME": "",
            "PATH_INFO": path,
            "QUERY_STRING": query.decode("latin-1"),  # PEP 3333: bytes as latin-1
            "SERVER_NAME": "localhost",
            "SERVER_PORT": "4000",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "HTTP_HOST": "localhost:4000",
            "REMOTE_ADDR": "127.0.0.1",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        if method == "POST":
            environ["CONTENT_LENGTH"] = str(len(body))
            environ["CONTENT_TYPE"] = content_type
        statuses = []
        result = self.app(environ, lambda status, headers, exc_info=None: statuses.append(status))
        answer = b"".join(result)
        note(f"{method} {path}?{query!r} body={body[:80]!r} -> {statuses[0]} {answer[:80]!r}")
        return int(statuses[0].split()[0]), answer

    def any_key(self, data, new=keys) -> str:
        """Return a stored key half the time (to overwrite, or to see untouched), else a new one."""
        if self.model and data.draw(st.booleans()):
            return data.draw(st.sampled_from(sorted(self.model)))
        return data.draw(new)

    def any_pairs(self, data, low: int, high: int, new=keys) -> list[tuple[str, str]]:
        """Return up to high (key, value) pairs with distinct keys, old and new ones."""
        pairs: dict[str, str] = {}
        for _ in range(data.draw(st.integers(low, high))):
            pairs.setdefault(self.any_key(data, new), data.draw(values))
        return list(pairs.items())

    # -- rules -----------------------------------------------------------------

    @initialize()
    def start_empty(self) -> None:
        assert self.request("GET", "/get", b"key=anything")[0] == 404

    @rule(data=st.data(), via=st.sampled_from(["query", "body", "both"]))
    def set_pairs(self, data, via: str) -> None:
        """GET or POST /set with one or more pairs, new keys and stored ones: all are stored."""
        pairs = self.any_pairs(data, 1, 5, st.one_of(keys, keys_at_limit))
        spelled = [data.draw(encoded(k)) + b"=" + data.draw(encoded(v)) for k, v in pairs]
        split = data.draw(st.integers(0, len(spelled))) if via == "both" else None
        if via == "query":
            status, body = self.request("GET", "/set", b"&".join(spelled))
        elif via == "body":
            status, body = self.request("POST", "/set", body=b"&".join(spelled))
        else:
            status, body = self.request(
                "POST", "/set", b"&".join(spelled[:split]), b"&".join(spelled[split:])
            )
        count = len(pairs)
        assert (status, body) == (200, f"stored {count} key{'' if count == 1 else 's'}\n".encode())
        for key, value in pairs:
            self.model[key] = value
            self.seen.add(key)

    @rule(data=st.data())
    def get_any(self, data) -> None:
        """GET /get of a stored key, or of a new one, in any legal spelling."""
        key = self.any_key(data)
        status, body = self.request("GET", "/get", b"key=" + data.draw(encoded(key)))
        if key in self.model:
            assert (status, body) == (200, self.model[key].encode("utf-8"))
        else:
            assert status == 404

    @rule(data=st.data(), bad=st.sampled_from(INVALID), via=st.sampled_from(["query", "body"]))
    def set_invalid(self, data, bad: tuple[bytes, int], via: str) -> None:
        """A /set with one bad pair among good ones: refused, and nothing stored."""
        fragment, expected = bad
        # Not "big": a second "big" would make the 413 fragments a 400 duplicate.
        pairs = [pair for pair in self.any_pairs(data, 0, 3) if pair[0] != "big"]
        spelled = [data.draw(encoded(k)) + b"=" + data.draw(encoded(v)) for k, v in pairs]
        spelled.insert(data.draw(st.integers(0, len(spelled))), fragment)
        joined = b"&".join(spelled)
        if via == "query":
            status, _ = self.request("GET", "/set", joined)
        else:
            status, _ = self.request("POST", "/set", body=joined)
        assert status == expected
        self.seen.update(key for key, _ in pairs)

    @rule(data=st.data(), value=values, other=values)
    def set_duplicate_key(self, data, value: str, other: str) -> None:
        """The same key twice in one request (spelled alike or not): 400, nothing stored."""
        key = self.any_key(data)
        first = data.draw(encoded(key)) + b"=" + data.draw(encoded(value))
        second = data.draw(encoded(key)) + b"=" + data.draw(encoded(other))
        if data.draw(st.booleans()):
            status, _ = self.request("GET", "/set", first + b"&" + second)
        else:
            status, _ = self.request("POST", "/set", first, second)
        assert status == 400
        self.seen.add(key)

    @rule(
        data=st.data(),
        value=values,
        request=st.sampled_from(
            [
                ("PUT", "/set", FORM),
                ("DELETE", "/set", FORM),
                ("POST", "/get", FORM),
                ("POST", "/set/", FORM),
                ("POST", "/SET", FORM),
                ("POST", "/set", "text/plain"),
                ("POST", "/set", "application/json"),
                ("POST", "/set", FORM + "; charset=latin-1"),
            ]
        ),
    )
    def wrong_request(self, data, value: str, request) -> None:
        """Wrong method, path or body type: 4xx, nothing stored."""
        method, path, content_type = request
        key = self.any_key(data)
        spelled = data.draw(encoded(key)) + b"=" + data.draw(encoded(value))
        status, _ = self.request(method, path, body=spelled, content_type=content_type)
        assert status in (404, 405, 415)
        self.seen.add(key)

    @rule()
    def reopen(self) -> None:
        """Close the app and its repository, and open the same file again."""
        self.app.close()
        self.app = create_app(self.settings)

    # -- what must always hold -------------------------------------------------

    @invariant()
    def store_equals_model(self) -> None:
        for key in sorted(self.seen):
            status, body = self.request(
                "GET", "/get", b"key=" + b"".join(b"%%%02X" % byte for byte in key.encode())
            )
            if key in self.model:
                assert (status, body) == (200, self.model[key].encode("utf-8")), key
            else:
                assert status == 404, key


# hypothesis gives up shrinking a failure after 300 s, the suite's default
# pytest timeout: allow more, so that a failure is reported, not a timeout.
@pytest.mark.timeout(480)
class TestKeyValueStoreEqualsADict(KeyValueMachine.TestCase):
    # report_multiple_bugs=False: shrink one failure, not each distinct one.
    # Everything else (derandomize, step count) comes from the loaded profile.
    settings = settings(
        max_examples=min(settings.default.max_examples, 60), report_multiple_bugs=False
    )
