import pytest
from helpers import curl

pytestmark = pytest.mark.backends("sqlite", "postgres")


def test_set_then_get_through_waitress(server):
    status, _, body = curl(f"{server.url}/set?a=1")
    assert (status, body) == (200, b"stored 1 key\n")
    status, headers, body = curl(f"{server.url}/get?key=a")
    assert (status, body) == (200, b"1")
    assert headers["content-type"] == "text/plain; charset=utf-8"
