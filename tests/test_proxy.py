"""Forwarded headers: believed from trusted_proxy only, and from nobody by default.

The client address a request is logged with is REMOTE_ADDR, which waitress
rewrites from X-Forwarded-For for trusted_proxy alone; X-Forwarded-Proto sets
wsgi.url_scheme, which the guard's Origin check uses.  Clients here connect
from 127.0.0.2 (all of 127/8 is loopback), so their own address differs from
127.0.0.1, the address a proxy on this host connects from.
"""

from __future__ import annotations

import warnings

import pytest
from helpers import curl
from proxykit import Kvapp
from waitress.adjustments import Adjustments

pytestmark = pytest.mark.slow

CLIENT = "127.0.0.2"
FORGED = "203.0.113.9"


def test_waitress_options_trust_no_proxy_by_default(make_settings):
    options = make_settings().waitress_options()
    assert options["clear_untrusted_proxy_headers"] is True
    assert not {"trusted_proxy", "trusted_proxy_headers", "trusted_proxy_count"} & set(options)
    adjustments = Adjustments(**options)
    assert adjustments.trusted_proxy is None
    assert adjustments.clear_untrusted_proxy_headers is True


def test_waitress_options_for_a_trusted_proxy(make_settings):
    settings = make_settings(
        trusted_proxy="0:0::1", trusted_proxy_headers="X-Forwarded-For", trusted_proxy_count=2
    )
    options = settings.waitress_options()
    assert options["trusted_proxy"] == "::1"  # as waitress compares it with REMOTE_ADDR
    assert options["trusted_proxy_headers"] == {"x-forwarded-for"}
    assert options["trusted_proxy_count"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. waitress's warning for a proxy without headers
        adjustments = Adjustments(**options)
    assert adjustments.trusted_proxy == "::1"
    assert adjustments.trusted_proxy_headers == {"x-forwarded-for"}


@pytest.fixture
def kvapp_factory(tmp_path, db_path):
    """Return a function starting `python -m kvapp serve` with a trusted_proxy."""
    started: list[Kvapp] = []

    def make(trusted_proxy: str) -> Kvapp:
        log = tmp_path / f"kvapp-{len(started)}.log"
        started.append(Kvapp(db_path, log, {"KVAPP_TRUSTED_PROXY": trusted_proxy}).start())
        return started[-1]

    yield make
    for kvapp in started:
        kvapp.stop()


@pytest.mark.parametrize("trusted_proxy", ["", "127.0.0.1"], ids=["no-proxy", "other-proxy"])
def test_a_direct_client_is_seen_as_itself_whatever_it_forwards(kvapp_factory, trusted_proxy):
    kvapp = kvapp_factory(trusted_proxy)
    forged = ("-H", f"X-Forwarded-For: {FORGED}", "-H", "X-Forwarded-Proto: https")
    # An http Origin is refused only over https: the forged proto is not believed.
    origin = ("-H", f"Origin: http://127.0.0.1:{kvapp.port}")
    status, _, body = curl("--interface", CLIENT, *forged, *origin, "-d", "k=v", f"{kvapp.url}/set")
    assert (status, body) == (200, b"stored 1 key\n")
    lines = kvapp.access_lines()
    assert len(lines) == 1 and lines[0].startswith(f'{CLIENT} "POST /set" 200 '), lines
    assert FORGED not in kvapp.output()


def test_the_trusted_proxy_passes_on_the_client_and_its_scheme(kvapp_factory):
    kvapp = kvapp_factory("127.0.0.1")  # curl from 127.0.0.1 stands in for nginx here
    url = f"{kvapp.url}/set"
    # The proxy appended the address it saw; the entry before it came from the client.
    chain = ("-H", f"X-Forwarded-For: 198.51.100.7, {FORGED}")
    assert curl(*chain, f"{url}?a=1")[0] == 200
    https = ("-H", "X-Forwarded-Proto: https", "-H", "Host: 127.0.0.1")
    status, _, _ = curl(*https, "-H", "Origin: http://127.0.0.1", "-d", "b=2", url)
    assert status == 403  # an http page writing to a server reached over https
    status, _, _ = curl(*https, "-H", "Origin: https://127.0.0.1", "-d", "c=3", url)
    assert status == 200
    lines = kvapp.access_lines()
    assert [line.split('" ')[0] for line in lines] == [
        f'{FORGED} "GET /set?a=***',
        '127.0.0.1 "POST /set',
        '127.0.0.1 "POST /set',
    ]
    assert "198.51.100.7" not in kvapp.output()
