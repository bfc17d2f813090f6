"""The export line format in process: any record survives a round trip, byte for byte."""

from __future__ import annotations

import base64
import json

from hypothesis import given
from hypothesis import strategies as st

from kvapp.store.base import MEDIA_TYPE, Record
from kvapp.tools import exportformat as exportfile

# Keys as kvapp accepts them: no C0/C1 controls or DEL, no surrogates (not UTF-8).
keys = st.text(
    st.characters(
        blacklist_categories=("Cs",), blacklist_characters=[chr(0x7F)], min_codepoint=0x20
    ).filter(lambda c: not 0x80 <= ord(c) < 0xA0),
    min_size=1,
    max_size=40,
)
values = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=100).map(lambda text: text.encode("utf-8", "surrogatepass")),
)
# Any content type the server stores (kvapp.store.base's media-type grammar).
content_types = st.from_regex(MEDIA_TYPE, fullmatch=True).filter(lambda text: len(text) <= 255)
records = st.builds(
    Record,
    key=keys,
    value=values,
    content_type=content_types,
    revision=st.integers(1, exportfile.MAX_REVISION),
    expires_at=st.none() | st.integers(0, exportfile.MAX_INTEGER),
)


def as_dict(record: Record) -> dict:
    line = {
        "key": record.key,
        "content_type": record.content_type,
        "revision": record.revision,
        "expires_at": record.expires_at,
    }
    try:
        line["value"] = record.value.decode("utf-8")
    except UnicodeDecodeError:
        line["value_b64"] = base64.b64encode(record.value).decode("ascii")
    return line


@given(records)
def test_every_record_comes_back_exactly(record):
    line = exportfile.encode(record)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    # One line whatever splits it: no raw U+0085, U+2028, U+2029 either.
    assert len(line.decode("utf-8").splitlines()) == 1
    obj = json.loads(line)
    assert exportfile.decode(2, obj, 1 << 30) == record
    # The hand-built line is the generic encoder's, byte for byte.
    assert line == exportfile._line(as_dict(record))


@given(st.lists(records, unique_by=lambda r: r.key, max_size=20))
def test_a_whole_file_reads_back(batch):
    batch.sort()
    data = [exportfile.header(), *map(exportfile.encode, batch), exportfile.trailer(len(batch))]
    assert list(exportfile.read(b"".join(data).splitlines(keepends=True), 1 << 30)) == batch
