"""kvapp.tools.atomicfile in process: a destination is replaced whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvapp.tools import atomicfile as atomic


@pytest.mark.parametrize("unnamed", [True, False])
def test_replacing_writes_whole_files_and_leaves_nothing_else(tmp_path: Path, unnamed):
    dest = tmp_path / "out.jsonl"
    dest.write_bytes(b"old")
    with atomic.replacing(dest, unnamed=unnamed) as out:
        out.write(b"new " * 1000)
        # Until the block ends, dest is the old file.
        assert dest.read_bytes() == b"old"
    assert dest.read_bytes() == b"new " * 1000
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl"]


@pytest.mark.parametrize("unnamed", [True, False])
def test_replacing_keeps_dest_when_the_writer_fails(tmp_path: Path, unnamed):
    dest = tmp_path / "out.jsonl"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic.replacing(dest, unnamed=unnamed) as out:
        out.write(b"half")
        raise RuntimeError("disk full, say")
    assert dest.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl"]


def test_aside_renames_on_success_and_cleans_up_on_failure(tmp_path: Path):
    dest = tmp_path / "kv.sqlite3"
    with pytest.raises(RuntimeError), atomic.aside(dest) as temp:
        temp.write_bytes(b"half")
        Path(f"{temp}-wal").write_bytes(b"wal")
        raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []
    with atomic.aside(dest) as temp:
        temp.write_bytes(b"whole")
    assert dest.read_bytes() == b"whole" and os.listdir(tmp_path) == ["kv.sqlite3"]


def test_aside_removes_what_dead_runs_left_and_spares_live_ones(tmp_path: Path):
    dest = tmp_path / "kv.sqlite3"
    dead = tmp_path / ".kv.sqlite3.tmp-999999999"  # above any pid_max: no such process
    live = tmp_path / f".kv.sqlite3.tmp-{os.getppid()}"
    for path in (dead, Path(f"{dead}-wal"), live):
        path.write_bytes(b"x")
    with atomic.aside(dest) as temp:
        temp.write_bytes(b"whole")
    assert sorted(os.listdir(tmp_path)) == sorted(["kv.sqlite3", live.name])


@pytest.mark.parametrize("unnamed", [True, False])
def test_replacing_without_replace_refuses_a_file_there_before_or_after(tmp_path: Path, unnamed):
    dest = tmp_path / "out.jsonl"
    dest.write_bytes(b"old")
    refused = pytest.raises(atomic.DestinationExists)
    with refused, atomic.replacing(dest, unnamed=unnamed, replace=False) as out:
        out.write(b"new")  # not reached: refused before any work
    assert dest.read_bytes() == b"old"
    dest.unlink()
    # A file that appears while the new one is written is kept: link(2) refuses, not replaces.
    with pytest.raises(atomic.DestinationExists) as caught:
        with atomic.replacing(dest, unnamed=unnamed, replace=False) as out:
            out.write(b"new")
            dest.write_bytes(b"theirs")
    assert caught.value.filename == str(dest)
    assert dest.read_bytes() == b"theirs"
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl"]
    dest.unlink()
    with atomic.replacing(dest, unnamed=unnamed, replace=False) as out:
        out.write(b"new")
    assert dest.read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["out.jsonl"]


def test_aside_without_replace_refuses_a_file_there_before_or_after(tmp_path: Path):
    dest = tmp_path / "kv.sqlite3"
    dest.write_bytes(b"old")
    with pytest.raises(atomic.DestinationExists), atomic.aside(dest, replace=False) as temp:
        temp.write_bytes(b"whole")  # not reached: refused before any work
    assert dest.read_bytes() == b"old" and os.listdir(tmp_path) == ["kv.sqlite3"]
    dest.unlink()
    with pytest.raises(atomic.DestinationExists), atomic.aside(dest, replace=False) as temp:
        temp.write_bytes(b"whole")
        dest.write_bytes(b"theirs")
    assert dest.read_bytes() == b"theirs" and os.listdir(tmp_path) == ["kv.sqlite3"]
    dest.unlink()
    with atomic.aside(dest, replace=False) as temp:
        temp.write_bytes(b"whole")
    assert dest.read_bytes() == b"whole" and os.listdir(tmp_path) == ["kv.sqlite3"]
