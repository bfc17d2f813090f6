"""The data tools, run as `python -m kvapp ...` subprocesses on real files and servers."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import shlex
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from bulk import TEXT, fill, sample
from faultkit import needs_root, overwrite, pages_of
from helpers import ROOT, VERSION_1, curl, server_environ
from tools import (
    Writers,
    kvapp,
    kvapp_command,
    kvapp_environ,
    meta_revision,
    one_line_error,
    open_files_in,
    rows,
    serving,
    start_kvapp,
    wait_for,
)

from kvapp.store.base import Record
from kvapp.tools import sqlitefile

pytestmark = pytest.mark.slow

COMMANDS = ("serve", "backup", "export", "import", "copy", "check", "stats")
HOUR_MS = 3_600_000


def now_ms() -> int:
    return int(time.time() * 1000)


# Expiry times for the sample records: fixed for the run, an hour or more ahead.
LATER = now_ms() + 2 * HOUR_MS


def awkward_records() -> list[Record]:
    """Records that a careless format would damage: every byte, empty, NUL, U+2028, TTLs."""
    later = LATER
    return [
        Record("binary", bytes(range(256)), "application/octet-stream", 3, None),
        Record("empty", b"", "text/plain", 4, later),
        Record("line\u2028separator", "a\u2028b\nc\r\n".encode(), TEXT, 5, None),
        Record("nul", b"a\x00b", "application/x-nul", 6, later + 1),
        Record("not-utf8", b"\xc3\x28\xed\xa0\x80", 'image/png; q="x"', 7, None),
        Record('weird "key" \\ /', b'{"json": true}', "application/json", 9, None),
        Record("ключ/日本/😀", "значение 😀".encode(), TEXT, 12, later + 2),
    ]


@pytest.fixture
def source_db(tmp_path: Path) -> Path:
    path = tmp_path / "source" / "kv.sqlite3"
    path.parent.mkdir()
    fill(path, iter(awkward_records()))
    return path


def folder_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


# -- --help and one-line errors ---------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = kvapp(command, "--help")
    assert result.returncode == 0
    assert result.stdout.decode().startswith(f"usage: python -m kvapp {command}")


def test_top_level_help_lists_every_command():
    out = kvapp("--help").stdout.decode()
    for command in COMMANDS:
        assert f"    {command} " in out


@pytest.mark.parametrize(
    "args",
    [(), ("export",), ("import",), ("backup",), ("copy", "--from", "a.sqlite3"), ("nonsense",)],
)
def test_usage_errors_are_one_line(args):
    result = kvapp(*args)
    assert result.returncode == 2
    assert "(see --help)" in one_line_error(result)


@pytest.mark.parametrize(
    ("args", "closed"),
    [(("import", "-"), "<&-"), (("export", "-"), ">&-"), (("import", "FILE"), "<&-")],
)
def test_a_closed_stdin_or_stdout_is_named_and_an_import_from_a_file_ignores_it(
    tmp_path, source_db, args, closed
):
    # A program started with fd 0 or 1 closed has sys.stdin or sys.stdout None:
    # "-" must say so, and an import from a file must neither care nor, after
    # succeeding, report a failure.
    exported = tmp_path / "e.jsonl"
    assert kvapp("export", "--database", str(source_db), str(exported)).returncode == 0
    target = tmp_path / "n.sqlite3"
    argv = [arg.replace("FILE", str(exported)) for arg in args]
    command = " ".join(shlex.quote(part) for part in kvapp_command(*argv, "--database"))
    database = str(source_db) if args[0] == "export" else str(target)
    result = subprocess.run(
        f"exec {command} {shlex.quote(database)} {closed}",
        shell=True,
        cwd=ROOT,
        env=kvapp_environ(),
        capture_output=True,
        timeout=120,
    )
    if "-" in args:
        name = "stdin" if args[0] == "import" else "stdout"
        assert result.returncode == 1
        assert one_line_error(result) == (
            f"kvapp {args[0]}: {name} is closed: give a file name instead of -\n"
        )
        assert not target.exists()
    else:
        assert result.returncode == 0, result.stderr
        assert rows(target) == rows(source_db)


def test_failures_exit_1_with_one_line(tmp_path, source_db):
    missing = tmp_path / "missing.sqlite3"
    not_db = tmp_path / "notes.txt"
    not_db.write_text("hello\n")
    cases = {
        ("export", "--database", str(missing), str(tmp_path / "e.jsonl")): "no database file",
        (
            "export",
            "--database",
            str(source_db),
            str(tmp_path / "no" / "e.jsonl"),
        ): "no such folder",
        ("export", "--database", str(source_db), str(tmp_path)): "is a folder",
        ("import", "--database", str(tmp_path / "n.sqlite3"), str(missing)): "No such file",
        ("import", "--database", str(tmp_path / "n.sqlite3"), str(not_db)): "line 1: not a kvapp",
        ("backup", "--database", str(missing), str(tmp_path / "b.sqlite3")): "no database file",
        ("backup", "--database", str(source_db), str(source_db)): "is the database itself",
        # --force would otherwise replace the database with its own export.
        ("export", "--force", "--database", str(source_db), str(source_db)): "database itself",
        ("export", "--force", "--database", str(source_db), f"{source_db}-gen"): "database itself",
        ("backup", "--force", "--database", str(source_db), f"{source_db}-gen"): "database itself",
        ("backup", "--database", str(not_db), str(tmp_path / "b.sqlite3")): "not an SQLite",
        ("backup", "--database", "postgresql://u@h/db", "b"): "works on SQLite files",
        ("check", "--database", str(missing)): "no database file",
        ("stats", "--database", str(not_db)): "not an SQLite database",
        ("copy", "--from", str(source_db), "--to", str(source_db)): "the same store",
        ("copy", "--from", str(missing), "--to", str(tmp_path / "c.sqlite3")): "no database file",
        (
            "copy",
            "--from",
            str(source_db),
            "--to",
            str(source_db.parent / ".." / "source" / "kv.sqlite3"),
        ): "the same store",  # noqa: E501
    }
    for args, says in cases.items():
        result = kvapp(*args)
        assert result.returncode == 1, (args, result)
        assert says in one_line_error(result), (args, result.stderr)
    result = kvapp("stats", config=tmp_path / "missing.ini")
    assert "missing.ini does not exist" in one_line_error(result)
    # Nothing was created by any of them.
    assert not missing.exists()
    assert folder_files(tmp_path) == ["notes.txt", "source"]


@pytest.mark.parametrize(
    "args",
    [
        ("copy", "--from", "SOURCE", "--to", "postgresql://kvapp@127.0.0.1:1/kvapp"),
        ("serve", "--port", "0"),
    ],
    ids=["copy", "serve"],
)
def test_postgresql_without_psycopg_is_one_line_naming_it(tmp_path, source_db, args):
    """A Python outside the venv (no psycopg) is told so, not that kvapp lacks PostgreSQL."""
    args = tuple(str(source_db) if arg == "SOURCE" else arg for arg in args)
    # As a Python without psycopg: importing it fails.
    code = (
        "import runpy, sys; sys.modules['psycopg'] = None;"
        f" sys.argv = ['kvapp', *{args!r}]; runpy.run_module('kvapp', run_name='__main__')"
    )
    env = server_environ() | {"KVAPP_DATABASE": "postgresql://kvapp@127.0.0.1:1/kvapp"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, timeout=60
    )
    error = one_line_error(result)
    assert "needs psycopg" in error and sys.executable in error, error
    assert ".venv/bin/python" in error


# Locations that look like URLs but name no store kvapp has: each was once
# taken as a file path (pgsql://h/db became the file ./pgsql:/h/db).
NOT_DATABASES = [
    "pgsql://kvapp@127.0.0.1/kvapp",
    "postgresql+psycopg://kvapp@127.0.0.1/kvapp",
    "http://localhost:4400/",
    "postgresql:/kvapp@127.0.0.1/kvapp",
]


def every_command_on(location: str, source: Path, export: Path) -> dict[str, tuple[str, ...]]:
    """Return each command's arguments with location as its database, source or destination."""
    return {
        "serve": ("serve", "--port", "0", "--database", location),
        "backup": ("backup", "--database", location, "backup.sqlite3"),
        "export": ("export", "--database", location, "export.jsonl"),
        "export-stdout": ("export", "--database", location, "-"),
        # The location is checked first, before the other arguments.
        "export-to-no-folder": ("export", "--database", location, "none/export.jsonl"),
        "import": ("import", "--database", location, str(export)),
        "import-no-file": ("import", "--database", location, "none.jsonl"),
        "import-merge": ("import", "--merge", "--database", location, str(export)),
        "copy-from": ("copy", "--from", location, "--to", "copy.sqlite3"),
        "copy-to": ("copy", "--from", str(source), "--to", location),
        "check": ("check", "--database", location),
        "stats": ("stats", "--database", location),
    }


def listing(folder: Path) -> list[str]:
    """Return every file and folder under folder, recursively, as relative paths."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


@pytest.fixture
def export_file(tmp_path: Path) -> Path:
    path = tmp_path / "source" / "export.jsonl"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"\n".join(GOOD) + b"\n")
    return path


@pytest.mark.parametrize("command", sorted(every_command_on("", Path(), Path())))
@pytest.mark.parametrize("location", NOT_DATABASES)
def test_a_url_kvapp_cannot_use_is_refused_and_creates_nothing(
    tmp_path, source_db, export_file, location, command
):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = listing(tmp_path)
    args = every_command_on(location, source_db, export_file)[command]
    result = kvapp(*args, cwd=cwd, timeout=60)
    assert result.returncode == 1, result
    error = one_line_error(result)
    assert f"{location!r} is not a supported database" in error, error
    assert listing(tmp_path) == before


@pytest.mark.parametrize("command", sorted(every_command_on("", Path(), Path())))
@pytest.mark.parametrize(
    ("location", "words"),
    [
        ("out/", "out/ names a folder: add a file name"),
        ("folder", "/cwd/folder is a folder: name a file in it"),
        ("~nosuchuser9/kv.sqlite3", "~nosuchuser9/kv.sqlite3: there is no user 'nosuchuser9'"),
    ],
    ids=["trailing-slash", "existing-folder", "unknown-user"],
)
def test_a_folder_is_refused_where_a_database_file_is_due_and_nothing_is_made(
    tmp_path, source_db, export_file, location, words, command
):
    # copy --to out/ made a file named out; --to=~/x.sqlite3 a folder named ~.
    cwd = tmp_path / "cwd"
    (cwd / "folder").mkdir(parents=True)
    before = listing(tmp_path)
    args = every_command_on(location, source_db, export_file)[command]
    result = kvapp(*args, cwd=cwd, timeout=60)
    assert result.returncode == 1, result
    assert one_line_error(result).rstrip("\n").endswith(words), result
    assert listing(tmp_path) == before


def test_a_leading_tilde_in_a_tool_s_path_is_the_home_folder(tmp_path, source_db):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    env = {"HOME": str(home)}
    result = kvapp("copy", "--from", str(source_db), "--to=~/copy.sqlite3", cwd=cwd, env=env)
    assert result.returncode == 0, result
    assert (home / "copy.sqlite3").is_file()
    assert listing(cwd) == []
    assert kvapp("stats", "--database=~/copy.sqlite3", cwd=cwd, env=env).returncode == 0


@pytest.mark.parametrize("location", NOT_DATABASES)
@pytest.mark.parametrize("where", ["environment", "config file"])
def test_serve_refuses_a_url_it_cannot_use_from_the_settings(tmp_path, location, where):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    config = tmp_path / "kv.ini"
    config.write_text(
        f"[storage]\ndatabase = {location}\n" if where == "config file" else "[storage]\n"
    )
    before = listing(tmp_path)
    env = {"KVAPP_DATABASE": location} if where == "environment" else {}
    result = kvapp("serve", "--port", "0", config=config, cwd=cwd, env=env, timeout=60)
    assert f"{location!r} is not a supported database" in one_line_error(result)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("name", ["data.sqlite3", "./weird:name.sqlite3"])
def test_relative_file_names_still_work_for_import_and_export(tmp_path, export_file, name):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = kvapp("import", "--database", name, str(export_file), cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().startswith(f"imported 3 records from {export_file} into {name}")
    file = cwd / Path(name).name
    assert [row[:2] for row in rows(file)] == [("a", b"1"), ("b", b"2"), ("c", b"3")]
    result = kvapp("export", "--database", name, "out.jsonl", cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert (cwd / "out.jsonl").read_bytes() == export_file.read_bytes()


def test_serve_database_option_is_relative_to_the_working_directory(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    with serving("--database", "here.sqlite3", cwd=cwd) as (_, port):
        status, _, body = curl(f"http://127.0.0.1:{port}/set?a=1")
        assert (status, body) == (200, b"stored 1 key\n")
    assert rows(cwd / "here.sqlite3")[0][:2] == ("a", b"1")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_on_a_taken_port_is_one_line_that_says_how_to_choose_another(tmp_path, workers):
    config = tmp_path / "serve.ini"
    config.write_text(f"[storage]\ndatabase = {tmp_path / 'kv.sqlite3'}\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = kvapp(
            "--config", str(config), "serve", "--port", port, "--workers", workers, config=None
        )
    assert result.returncode == 1
    # The failure is one line that names the address and the way out, no traceback.
    assert one_line_error(result).splitlines() == [
        f"kvapp: cannot listen on 127.0.0.1:{port}: Address already in use;"
        " choose another port with --port or KVAPP_PORT"
    ]


# -- one rule for destinations that hold data ---------------------------------


@pytest.mark.parametrize("command", ["backup", "export", "import", "copy"])
def test_help_states_the_destination_rule(command):
    text = " ".join(kvapp(command, "--help").stdout.decode().split())
    assert (
        "A destination that holds data is refused: an existing FILE (backup, export) unless"
        " --force, a database with keys (import, copy) unless --merge."
    ) in text
    flag = "--force" if command in ("backup", "export") else "--merge"
    assert f"[{flag}]" in text


@pytest.mark.parametrize("command", ["backup", "export"])
def test_an_existing_file_is_refused_and_replaced_with_force(tmp_path, source_db, command):
    dest = tmp_path / "out" / "dest"
    dest.parent.mkdir()
    dest.write_bytes(b"keep me")
    result = kvapp(command, "--database", str(source_db), str(dest))
    error = one_line_error(result)
    assert result.returncode == 1
    assert error == f"kvapp {command}: {dest} already exists; give --force to replace it\n"
    assert dest.read_bytes() == b"keep me" and folder_files(dest.parent) == ["dest"]
    result = kvapp(command, "--force", "--database", str(source_db), str(dest))
    assert result.returncode == 0, result.stderr
    assert folder_files(dest.parent) == ["dest"]
    if command == "backup":
        assert rows(dest) == rows(source_db)
    else:
        assert dest.read_bytes() == kvapp("export", "--database", str(source_db), "-").stdout


# -- export and import --------------------------------------------------------


def test_round_trip_is_exact_through_a_file(tmp_path, source_db):
    export = tmp_path / "dump.jsonl"
    result = kvapp("export", "--database", str(source_db), str(export))
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().startswith(f"exported 7 records from {source_db} to {export}")
    target = tmp_path / "restored" / "kv.sqlite3"
    result = kvapp("import", "--database", str(target), str(export))
    assert result.returncode == 0, result.stderr
    assert rows(target) == rows(source_db) == sorted(awkward_records())
    # Later writes never reuse a revision (an ETag) that a loaded key carries.
    assert meta_revision(target) >= max(record.revision for record in awkward_records())
    assert folder_files(target.parent) == ["kv.sqlite3"]


def test_round_trip_through_a_pipe(tmp_path, source_db):
    target = tmp_path / "piped.sqlite3"
    exporter = start_kvapp(
        "export", "--database", str(source_db), "-", stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    importer = start_kvapp(
        "import", "--database", str(target), "-", stdin=exporter.stdout, stdout=subprocess.PIPE
    )
    exporter.stdout.close()
    out, _ = importer.communicate(timeout=120)
    assert exporter.wait(timeout=120) == 0
    assert exporter.stderr.read() == b""  # quiet in a pipe: no progress bar, no summary
    exporter.stderr.close()
    assert importer.returncode == 0
    assert out.decode().startswith("imported 7 records from - into")
    assert rows(target) == rows(source_db)


def test_export_lines_follow_format_version_1(tmp_path, source_db):
    out = kvapp("export", "--database", str(source_db), "-").stdout
    # Even str.splitlines, which also splits at U+2028, finds one record per line.
    assert "\u2028".encode() not in out and b"a\\u2028b\\nc\\r\\n" in out
    lines = out.decode().splitlines()
    assert len(lines) == 9
    assert json.loads(lines[0]) == {"format": "kvapp-export", "version": 1}
    assert json.loads(lines[-1]) == {"records": 7}
    records = [json.loads(line) for line in lines[1:-1]]
    assert [r["key"] for r in records] == sorted(r.key for r in awkward_records())
    by_key = {r["key"]: r for r in records}
    # UTF-8 values are readable text; anything else is base64.
    assert by_key["nul"]["value"] == "a\x00b"
    assert by_key["line\u2028separator"]["value"] == "a\u2028b\nc\r\n"
    assert by_key["ключ/日本/😀"]["value"] == "значение 😀"
    assert "value" not in by_key["not-utf8"] and by_key["not-utf8"]["value_b64"] == "wyjtoIA="
    assert by_key["binary"]["expires_at"] is None
    assert by_key["empty"] == {
        "key": "empty",
        "content_type": "text/plain",
        "revision": 4,
        "expires_at": awkward_records()[1].expires_at,
        "value": "",
    }


def test_export_leaves_out_expired_keys(tmp_path):
    db = tmp_path / "kv.sqlite3"
    fill(
        db, iter([Record("gone", b"x", TEXT, 1, now_ms() - 1), Record("kept", b"y", TEXT, 2, None)])
    )
    lines = kvapp("export", "--database", str(db), "-").stdout.decode().splitlines()
    assert [json.loads(line).get("key") for line in lines] == [None, "kept", None]


GOOD = [
    b'{"format":"kvapp-export","version":1}',
    b'{"key":"a","content_type":"text/plain","revision":1,"expires_at":null,"value":"1"}',
    b'{"key":"b","content_type":"text/plain","revision":2,"expires_at":null,"value":"2"}',
    b'{"key":"c","content_type":"text/plain","revision":3,"expires_at":null,"value":"3"}',
    b'{"records":3}',
]


def with_line(number: int, line: bytes | None) -> bytes:
    """Return GOOD with line number (1-based) replaced, or removed when line is None."""
    lines = list(GOOD)
    if line is None:
        del lines[number - 1]
    else:
        lines[number - 1] = line
    return b"\n".join(lines) + b"\n"


MALFORMED = {
    "not json": (with_line(3, b'{"key":"b",'), 3, "not valid JSON"),
    "not utf-8": (with_line(3, b'{"key":"\xff"}'), 3, "not UTF-8"),
    "missing field": (
        with_line(3, b'{"key":"b","content_type":"text/plain","revision":2,"value":"2"}'),
        3,
        "exactly the fields",
    ),
    "bad base64": (
        with_line(
            3, b'{"key":"b","content_type":"x/y","revision":2,"expires_at":null,"value_b64":"@@"}'
        ),
        3,
        "not valid base64",
    ),
    "revision as text": (
        with_line(
            3, b'{"key":"b","content_type":"x/y","revision":"2","expires_at":null,"value":""}'
        ),
        3,
        "revision must be",
    ),
    "control in key": (
        with_line(
            3, b'{"key":"b\\n","content_type":"x/y","revision":2,"expires_at":null,"value":""}'
        ),
        3,
        "control character",
    ),
    "lone surrogate": (
        with_line(
            3, b'{"key":"\\ud800","content_type":"x/y","revision":2,"expires_at":null,"value":""}'
        ),
        3,
        "lone surrogate",
    ),
    # The server's rules: one media type (a browser reads this list as text/html),
    # and a revision that leaves room for the writes after it.
    "content type list": (
        with_line(3, GOOD[2].replace(b'"text/plain"', b'"text/plain; a=b, text/html"')),
        3,
        "content_type: the content type must be a media type",
    ),
    "last revision": (
        with_line(3, GOOD[2].replace(b'"revision":2', b'"revision":9223372036854775807')),
        3,
        "revision must be a whole number from 1 to 4611686018427387904",
    ),
    "version true": (with_line(1, b'{"format":"kvapp-export","version":true}'), 1, "version"),
    "version 1.0": (with_line(1, b'{"format":"kvapp-export","version":1.0}'), 1, "version"),
    "base64 not canonical": (
        with_line(3, GOOD[2].replace(b'"value":"2"', b'"value_b64":"QR=="')),
        3,
        "not canonical base64",
    ),
    "nested too deeply": (with_line(3, b"[" * 200_000), 3, "nested too deeply"),
    "out of order": (with_line(4, GOOD[1].replace(b'"a"', b'"aa"')), 4, "increasing"),
    "repeated": (with_line(4, GOOD[2]), 4, "increasing"),
    "cut short": (with_line(5, None), 5, "cut short"),
    "wrong count": (with_line(5, b'{"records":4}'), 5, "holds 4 records, not 3"),
    "newer version": (with_line(1, b'{"format":"kvapp-export","version":2}'), 1, "version 2"),
    "after the end": (with_line(5, GOOD[4] + b"\n" + GOOD[3]), 6, "after the last line"),
    "empty": (b"", 1, "the file is empty"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_import_names_the_line_and_changes_nothing(tmp_path, source_db, case):
    data, line, says = MALFORMED[case]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(data)
    before = rows(source_db)
    revision = meta_revision(source_db)
    result = kvapp("import", "--merge", "--database", str(source_db), str(bad))
    assert result.returncode == 1
    err = one_line_error(result)
    assert err.startswith(f"kvapp import: line {line}: "), err
    assert says in err and "nothing was imported" in err
    assert rows(source_db) == before and meta_revision(source_db) == revision
    # Into a new file: no file appears, and nothing is left beside it.
    fresh = tmp_path / "new" / "kv.sqlite3"
    result = kvapp("import", "--database", str(fresh), "-", input=data)
    assert err.split(": ", 1)[1] == one_line_error(result).split(": ", 1)[1]
    assert not fresh.exists() and folder_files(fresh.parent) == []


def test_import_into_keys_needs_merge_and_then_replaces_same_keys(tmp_path, source_db):
    export = tmp_path / "dump.jsonl"
    lines = [GOOD[0], GOOD[1].replace(b'"a"', b'"binary"'), GOOD[3], GOOD[4].replace(b"3", b"2")]
    export.write_bytes(b"\n".join(lines) + b"\n")
    result = kvapp("import", "--database", str(source_db), str(export))
    assert "already holds keys; give --merge" in one_line_error(result)
    before = meta_revision(source_db)
    result = kvapp("import", "--merge", "--database", str(source_db), str(export))
    assert result.returncode == 0, result.stderr
    after = {row[0]: row for row in rows(source_db)}
    # Above every revision the store had used: "binary" had ETag 3 for another value.
    assert after["binary"] == ("binary", b"1", "text/plain", before + 1, None)
    assert after["c"] == ("c", b"3", "text/plain", before + 3, None)
    assert after["nul"] == awkward_records()[3]  # not in the file: kept


@pytest.mark.parametrize("how", ["import", "copy"])
def test_a_merge_never_gives_a_key_an_etag_it_had_for_another_value(tmp_path, how):
    # The target gave "a" ETag 1 and "b" ETag 2; the source has other values
    # under the same revisions, and "c" equal to the target's.
    target = tmp_path / "target.sqlite3"
    mine = [("a", b"mine-a", 1), ("b", b"mine-b", 2), ("c", b"same", 3)]
    fill(target, iter(Record(key, value, TEXT, rev, None) for key, value, rev in mine))
    source = tmp_path / "source.sqlite3"
    other = [("a", b"other-a", 1), ("b", b"other-b", 2), ("c", b"same", 7), ("d", b"new", 2)]
    fill(source, iter(Record(key, value, TEXT, rev, None) for key, value, rev in other))
    before = meta_revision(target)
    if how == "import":
        export = tmp_path / "dump.jsonl"
        assert kvapp("export", "--database", str(source), str(export)).returncode == 0
        result = kvapp("import", "--merge", "--database", str(target), str(export))
    else:
        result = kvapp("copy", "--merge", "--from", str(source), "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert rows(target) == [
        ("a", b"other-a", TEXT, before + 1, None),
        ("b", b"other-b", TEXT, before + 2, None),
        ("c", b"same", TEXT, 3, None),  # unchanged: it keeps its ETag
        ("d", b"new", TEXT, before + 2, None),
    ]
    assert meta_revision(target) > before + 7  # no later write takes a loaded ETag


def test_an_import_into_a_store_no_write_has_touched_keeps_the_etags(tmp_path, source_db):
    export = tmp_path / "dump.jsonl"
    assert kvapp("export", "--database", str(source_db), str(export)).returncode == 0
    target = tmp_path / "target.sqlite3"
    empty_database(target)
    assert meta_revision(target) == 0
    result = kvapp("import", "--database", str(target), str(export))
    assert result.returncode == 0, result.stderr
    assert rows(target) == rows(source_db)
    assert meta_revision(target) >= 12  # no later write takes a loaded ETag


def fail_on_key(path: Path, key: str) -> None:
    """Make the database refuse to store key, as a full disk or a lost server would mid-way."""
    conn = sqlite3.connect(path)
    conn.execute(
        f"CREATE TRIGGER fail BEFORE INSERT ON kv WHEN NEW.key = '{key}'"
        " BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
    )
    conn.commit()
    conn.close()


def drop_trigger(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("DROP TRIGGER fail")
    conn.commit()
    conn.close()


def empty_database(path: Path) -> None:
    fill(path, iter([]))


@pytest.mark.parametrize("how", ["import", "copy"])
def test_failure_midway_into_an_empty_database_leaves_it_empty(tmp_path, how):
    source = tmp_path / "source.sqlite3"
    fill(source, sample(5_500))
    export = tmp_path / "dump.jsonl"
    assert kvapp("export", "--database", str(source), str(export)).returncode == 0
    target = tmp_path / "target.sqlite3"
    empty_database(target)
    fail_on_key(target, "key-000004500")  # in the fifth transaction of 1000
    if how == "import":
        result = kvapp("import", "--database", str(target), str(export))
    else:
        result = kvapp("copy", "--from", str(source), "--to", str(target))
    err = one_line_error(result)
    assert "injected failure" in err and "--merge" not in err
    assert rows(target) == []


@pytest.mark.parametrize("how", ["import", "copy"])
def test_failed_merge_is_finished_by_running_it_again(tmp_path, how):
    source = tmp_path / "source.sqlite3"
    fill(source, sample(5_500))
    export = tmp_path / "dump.jsonl"
    assert kvapp("export", "--database", str(source), str(export)).returncode == 0
    target = tmp_path / "target.sqlite3"
    fill(target, iter([Record("zzz", b"mine", TEXT, 1, None)]))
    fail_on_key(target, "key-000004500")
    if how == "import":
        args = ("import", "--merge", "--database", str(target), str(export))
    else:
        args = ("copy", "--merge", "--from", str(source), "--to", str(target))
    err = one_line_error(kvapp(*args))
    assert "the destination holds the first 4000 records (through key 'key-000003999')" in err
    assert "run the same command with --merge to finish" in err
    first = rows(target)
    assert len(first) == 4001
    drop_trigger(target)
    result = kvapp(*args)
    assert result.returncode == 0, result.stderr
    after = rows(target)
    assert [row[:3] + row[4:] for row in after] == [
        row[:3] + row[4:] for row in rows(source) + [("zzz", b"mine", TEXT, 1, None)]
    ]
    # The run again changed nothing it had loaded: those keep their ETags.
    assert after[:4000] == first[:4000] and after[-1] == ("zzz", b"mine", TEXT, 1, None)


# -- copy ---------------------------------------------------------------------


def test_copy_sqlite_to_sqlite_keeps_every_record(tmp_path, source_db):
    target = tmp_path / "copy" / "kv.sqlite3"
    result = kvapp("copy", "--from", str(source_db), "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().startswith(f"copied 7 records from {source_db} to {target}")
    assert rows(target) == rows(source_db)
    assert meta_revision(target) >= 12
    assert folder_files(target.parent) == ["kv.sqlite3"]
    result = kvapp("copy", "--from", str(source_db), "--to", str(target))
    assert "already holds keys; give --merge" in one_line_error(result)


# -- check and stats ----------------------------------------------------------


def test_an_empty_file_is_no_source_but_a_destination_in_place(tmp_path, source_db):
    empty = tmp_path / "empty.sqlite3"
    empty.touch()
    for args in (
        ("export", "--database", str(empty), str(tmp_path / "e.jsonl")),
        ("copy", "--from", str(empty), "--to", str(tmp_path / "c.sqlite3")),
    ):
        result = kvapp(*args)
        assert one_line_error(result).endswith(f"{empty} is empty, not a kvapp database\n"), args
    assert sorted(path.name for path in tmp_path.iterdir()) == ["empty.sqlite3", "source"]
    assert empty.stat().st_size == 0
    # As a destination it becomes the database in place, keeping its mode (and owner).
    empty.chmod(0o600)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(MALFORMED["wrong count"][0])
    assert kvapp("import", "--database", str(empty), str(bad)).returncode == 1
    exported = kvapp("export", "--database", str(source_db), "-").stdout
    assert kvapp("import", "--database", str(empty), "-", input=exported).returncode == 0
    assert rows(empty) == rows(source_db)
    assert empty.stat().st_mode & 0o777 == 0o600


def test_check_passes_a_sound_database(source_db):
    result = kvapp("check", "--database", str(source_db))
    assert result.returncode == 0
    assert result.stdout.decode() == (
        f"ok: {source_db} passed PRAGMA integrity_check and kvapp's schema checks\n"
    )


@needs_root
def test_check_and_stats_read_a_backup_on_a_read_only_mount(tmp_path, source_db):
    # A backup is a WAL database (header bytes 18-19); read-only, SQLite
    # needs a -shm file that a read-only filesystem cannot hold.
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    backup = shelf / "b.sqlite3"
    assert kvapp("backup", "--database", str(source_db), str(backup)).returncode == 0
    assert backup.read_bytes()[18:20] == b"\x02\x02"
    subprocess.run(["mount", "--bind", str(shelf), str(shelf)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(shelf)], check=True)
        result = kvapp("check", "--database", str(backup))
        assert (result.returncode, result.stderr) == (0, b""), result.stderr
        stats = kvapp("stats", "--json", "--database", str(backup))
        assert stats.returncode == 0, stats.stderr
        assert json.loads(stats.stdout)["keys"] == len(rows(source_db))
    finally:
        subprocess.run(["umount", "--lazy", str(shelf)], check=True)
    assert sorted(path.name for path in shelf.iterdir()) == ["b.sqlite3"]


@needs_root
def test_a_read_through_a_read_only_mount_of_a_file_that_changed_is_refused(tmp_path, source_db):
    # The same file through a writable path: immutable=1 would have read
    # pages of two versions, so the read must not count.
    shelf, view = tmp_path / "shelf", tmp_path / "view"
    shelf.mkdir()
    view.mkdir()
    assert kvapp("backup", "--database", str(source_db), str(shelf / "b.sqlite3")).returncode == 0
    subprocess.run(["mount", "--bind", str(shelf), str(view)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True)
        with pytest.raises(sqlitefile.NotUsable, match="changed while it was read"):
            with sqlitefile._reading(view / "b.sqlite3") as conn:
                conn.execute("SELECT count(*) FROM kv").fetchone()
                writer = sqlite3.connect(shelf / "b.sqlite3", isolation_level=None)
                writer.execute("DELETE FROM kv")
                writer.close()  # the last connection: it checkpoints and removes the -wal
        with sqlitefile._reading(view / "b.sqlite3") as conn:  # nothing writes it now
            assert conn.execute("SELECT count(*) FROM kv").fetchone() == (0,)
    finally:
        subprocess.run(["umount", "--lazy", str(view)], check=True)


def break_index(path: Path) -> None:
    fill(path, sample(3_000))
    page = 4096
    for number in pages_of(path, "sqlite_autoindex_kv_1")[1:]:
        overwrite(path, (number - 1) * page, bytes(page))


def break_revision(path: Path) -> None:
    fill(path, sample(10))
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = 2 WHERE name = 'revision'")
    conn.commit()
    conn.close()


def foreign_table(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (body TEXT)")
    conn.close()


def wrong_type(path: Path) -> None:
    fill(path, sample(10))
    conn = sqlite3.connect(path)
    conn.execute("UPDATE kv SET value = 'text, not a blob' WHERE key = 'key-000000003'")
    conn.commit()
    conn.close()


@pytest.mark.parametrize(
    "damage, says",
    [
        (break_index, "integrity_check"),
        (break_revision, "above the store's revision 2"),
        (foreign_table, "table kv is missing: this is not a kvapp database"),
        (wrong_type, "1 rows hold values of the wrong type"),
    ],
)
def test_check_fails_with_one_line_reason(tmp_path, damage, says):
    db = tmp_path / "kv.sqlite3"
    damage(db)
    result = kvapp("check", "--database", str(db))
    assert result.returncode == 1
    err = one_line_error(result)
    assert err.startswith(f"kvapp check: {db}: ") and says in err, err


def test_stats_counts_from_the_file(tmp_path):
    db = tmp_path / "kv.sqlite3"
    records = list(sample(100, expires_at=now_ms() + HOUR_MS))
    records.append(Record("zz-expired", b"12345", TEXT, 500, now_ms() - 1000))
    fill(db, iter(records))
    live = records[:-1]
    result = kvapp("stats", "--json", "--database", str(db))
    assert result.returncode == 0
    figures = json.loads(result.stdout)
    assert figures == {
        "database": str(db),
        "schema_version": 2,
        "revision": 500,
        "keys": 100,
        "expiring_keys": sum(1 for r in live if r.expires_at is not None),
        "expired_rows": 1,
        "key_bytes": sum(len(r.key.encode()) for r in live),
        "value_bytes": sum(len(r.value) for r in live),
        "file_bytes": db.stat().st_size,
        "wal_bytes": 0,
        "free_bytes": figures["free_bytes"],
    }
    assert figures["expiring_keys"] == 20
    text = kvapp("stats", "--database", str(db)).stdout.decode()
    assert "keys            100\n" in text and "expired rows    1\n" in text


# -- progress: on a terminal only ---------------------------------------------


def run_on_terminal(*args: str) -> tuple[int, bytes]:
    """Run kvapp with stderr on a pseudo-terminal; return (exit status, what it drew there)."""
    leader, follower = pty.openpty()
    # A terminal 100 columns wide: tqdm draws nothing on one of 0 columns.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        process = start_kvapp(*args, stdout=subprocess.DEVNULL, stderr=follower)
        os.close(follower)
        drawn = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            drawn += chunk
        return process.wait(timeout=120), drawn
    finally:
        os.close(leader)


def test_progress_bar_on_a_terminal_and_none_in_a_pipe(tmp_path):
    db = tmp_path / "kv.sqlite3"
    fill(db, sample(20_000))
    status, drawn = run_on_terminal("export", "--database", str(db), str(tmp_path / "e.jsonl"))
    assert status == 0
    assert b"export:" in drawn and b"rec" in drawn and b"20.0k" in drawn
    piped = kvapp("export", "--database", str(db), str(tmp_path / "f.jsonl"))
    assert piped.returncode == 0 and piped.stderr == b""
    status, drawn = run_on_terminal("backup", "--database", str(db), str(tmp_path / "b.sqlite3"))
    assert status == 0 and b"backup:" in drawn and b"page" in drawn


# -- interruptions leave no partial file --------------------------------------


@pytest.fixture(scope="module")
def big_db(tmp_path_factory) -> Path:
    """About 130 MB: long enough to stop an export or a backup half-way."""
    path = tmp_path_factory.mktemp("big") / "kv.sqlite3"
    records = (Record(f"key-{i:07d}", os.urandom(1000), TEXT, i + 1, None) for i in range(120_000))
    fill(path, records)
    return path


def stop_midway(process: subprocess.Popen, folder: Path, signum: int) -> None:
    """Wait until process has written into folder, pause it, check it is mid-way, send signum."""
    wait_for(lambda: any(size > 1_000_000 for size in open_files_in(process.pid, folder)))
    process.send_signal(signal.SIGSTOP)
    assert process.poll() is None
    process.send_signal(signum)
    process.send_signal(signal.SIGCONT)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_interrupted_export_leaves_no_file(tmp_path, big_db, signum):
    out = tmp_path / "out"
    out.mkdir()
    process = start_kvapp(
        "export", "--database", str(big_db), str(out / "e.jsonl"), stderr=subprocess.PIPE
    )
    stop_midway(process, out, signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode in (-signum, 128 + signum)
    if signum != signal.SIGKILL:
        assert process.returncode == 128 + signum
        assert err.decode() == f"kvapp export: interrupted by {signal.Signals(signum).name}\n"
    # O_TMPFILE: even a SIGKILL leaves nothing, not even a temporary file.
    assert folder_files(out) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_interrupted_backup_leaves_no_backup(tmp_path, big_db, signum):
    out = tmp_path / "out"
    out.mkdir()
    target = out / "backup.sqlite3"
    process = start_kvapp("backup", "--database", str(big_db), str(target), stderr=subprocess.PIPE)
    stop_midway(process, out, signum)
    _, err = process.communicate(timeout=60)
    assert not target.exists()
    if signum == signal.SIGTERM:
        assert process.returncode == 128 + signum
        assert err.decode() == "kvapp backup: interrupted by SIGTERM\n"
        assert folder_files(out) == []
    else:
        # A killed run leaves its temporary file, never a backup; the next run clears it.
        assert [name.startswith(".backup.sqlite3.tmp-") for name in folder_files(out)] == [True]
        result = kvapp("backup", "--database", str(big_db), str(target))
        assert result.returncode == 0, result.stderr
        assert folder_files(out) == ["backup.sqlite3"]
        assert kvapp("check", "--database", str(target)).returncode == 0


def test_interrupted_import_leaves_no_database(tmp_path, big_db):
    export = tmp_path / "e.jsonl"
    assert kvapp("export", "--database", str(big_db), str(export)).returncode == 0
    out = tmp_path / "out"
    out.mkdir()
    process = start_kvapp(
        "import", "--database", str(out / "kv.sqlite3"), str(export), stderr=subprocess.PIPE
    )
    stop_midway(process, out, signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM
    assert err.decode() == "kvapp import: interrupted by SIGTERM\n"
    assert folder_files(out) == []


def test_export_to_a_closed_pipe_is_one_line(big_db):
    process = start_kvapp(
        "export", "--database", str(big_db), "-", stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdout.readline().startswith(b'{"format":"kvapp-export"')
    process.stdout.close()  # as `| head -1` does
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert err.decode() == "kvapp export: the output pipe was closed before the export ended\n"


@pytest.mark.parametrize("suffix", ["-wal", "-journal"])
def test_a_new_database_file_is_never_paired_with_an_old_wal(tmp_path, source_db, suffix):
    """SQLite would apply a leftover WAL or journal to whatever file then has the name."""
    backup = tmp_path / "backup.sqlite3"
    assert kvapp("backup", "--database", str(source_db), str(backup)).returncode == 0
    before = backup.read_bytes()
    stale = Path(f"{backup}{suffix}")
    stale.write_bytes(b"left by a reader that was killed")
    result = kvapp("backup", "--force", "--database", str(source_db), str(backup))
    assert f"backup.sqlite3{suffix} is beside it" in one_line_error(result)
    assert backup.read_bytes() == before
    # A database that was deleted but left its WAL: import and copy refuse too.
    backup.unlink()
    export = tmp_path / "e.jsonl"
    assert kvapp("export", "--database", str(source_db), str(export)).returncode == 0
    for args in (
        ("import", "--database", str(backup), str(export)),
        ("copy", "--from", str(source_db), "--to", str(backup)),
    ):
        assert f"{suffix} is beside it" in one_line_error(kvapp(*args))
        assert not backup.exists()
    assert stale.read_bytes() == b"left by a reader that was killed"


# -- backup of a live server --------------------------------------------------


def test_backup_during_writes_is_consistent_and_complete(server_factory, db_path, tmp_path):
    server = server_factory()
    backup = tmp_path / "backups" / "kv.sqlite3"
    backup.parent.mkdir()
    with Writers(server.port) as writers:
        wait_for(lambda: len(writers.snapshot()) >= 200)
        before = writers.snapshot()
        result = kvapp("backup", "--database", str(db_path), str(backup))
        after_count = len(writers.snapshot())
        wait_for(lambda: len(writers.snapshot()) > after_count)  # still writing
    assert writers.failures == []
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().startswith(f"backed up {db_path} to {backup}: ")
    assert kvapp("check", "--database", str(backup)).returncode == 0
    stored = {row[0]: row[1] for row in rows(backup)}
    missing = [key for key, value, _ in before if stored.get(key) != value]
    assert missing == []
    # Restoring is copying the file into place: a server on it serves the data.
    restored = tmp_path / "restored" / "kv.sqlite3"
    restored.parent.mkdir()
    restored.write_bytes(backup.read_bytes())
    again = server_factory(path=restored)
    key, value, _ = before[-1]
    status, _, body = curl(f"{again.url}/kv/{key}")
    assert (status, body) == (200, value)


def test_check_accepts_a_version_1_file_that_kvapp_upgrades_when_it_opens_it(tmp_path):
    # An old backup: the first releases' schema, without the change log.
    db = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(db)
    for statement in VERSION_1:
        conn.execute(statement)
    conn.execute("INSERT INTO kv VALUES ('a', x'31', 'text/plain', 7, NULL)")
    conn.commit()
    conn.close()
    result = kvapp("check", "--database", str(db))
    assert result.returncode == 0, result.stderr
    # A version 2 file without its change log is damaged.
    db.unlink()
    fill(db, iter(sample(3)))
    conn = sqlite3.connect(db)
    conn.execute("DROP TABLE changes")
    conn.commit()
    conn.close()
    result = kvapp("check", "--database", str(db))
    assert result.returncode == 1
    assert "table changes is missing" in one_line_error(result)


def test_a_failed_backup_names_both_files(tmp_path, source_db, monkeypatch):
    # SQLite's backup API reports a failed read of the source and a failed
    # write of the copy alike, so the message must not blame the copy alone.
    def fail(conn, copy, progress):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(sqlitefile, "_copy", fail)
    target = tmp_path / "b.sqlite3"
    with pytest.raises(sqlitefile.NotUsable) as failed:
        sqlitefile.backup(source_db, target)
    assert str(failed.value) == f"cannot back {source_db} up into {target}: disk I/O error"
