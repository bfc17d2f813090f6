"""pip install: the package's metadata, the default locations, and an installed `kvapp`.

From a checkout kvapp reads the config.ini beside it; installed, it follows the
XDG Base Directory Specification (kvapp/config.py, docs/install.md).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import pytest
from helpers import ROOT, curl

from kvapp.config import (
    BUILT_IN,
    CHECKOUT_CONFIG,
    ConfigError,
    default_config,
    describe_config,
    is_checkout,
    load_config,
)

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def pins(path: Path) -> set[str]:
    """Return the requirement lines of a requirements file, comments left out."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return {line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()}


# -- the metadata ----------------------------------------------------------------


def test_dependencies_are_pinned_as_in_requirements_txt():
    """requirements.txt (the Quick start's install) and `pip install .[postgresql]` agree."""
    project = PYPROJECT["project"]
    installed = set(project["dependencies"]) | set(project["optional-dependencies"]["postgresql"])
    assert installed == pins(ROOT / "requirements.txt")
    assert not any(name.startswith("psycopg") for name in project["dependencies"])


def test_granian_extra_is_pinned_as_in_bench_requirements_txt():
    granian = set(PYPROJECT["project"]["optional-dependencies"]["granian"])
    assert any(pin.startswith("granian==") for pin in granian)
    assert granian <= pins(ROOT / "bench" / "requirements.txt")


def test_the_kvapp_command_is_main_of_kvapp_main():
    assert PYPROJECT["project"]["scripts"] == {"kvapp": "kvapp.__main__:main"}
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"


# -- where the defaults live -----------------------------------------------------


def test_a_checkout_is_told_by_the_config_ini_beside_the_package(tmp_path: Path):
    assert is_checkout()  # these tests run from one
    assert not is_checkout(tmp_path / "config.ini")
    (tmp_path / "config.ini").write_text("", encoding="utf-8")
    assert is_checkout(tmp_path / "config.ini")


def test_from_a_checkout_the_config_ini_beside_it_is_read(tmp_path: Path):
    environ = {"HOME": str(tmp_path)}
    (tmp_path / ".config" / "kvapp").mkdir(parents=True)
    (tmp_path / ".config" / "kvapp" / "config.ini").write_text("", encoding="utf-8")
    assert default_config(environ, installed=False) == CHECKOUT_CONFIG
    settings = load_config(environ=environ, installed=False)
    assert settings.source == str(CHECKOUT_CONFIG)
    assert settings.database == str(ROOT / "data" / "kvapp.sqlite3")


def test_installed_with_no_config_file_uses_built_in_defaults(tmp_path: Path):
    environ = {"HOME": str(tmp_path / "home")}
    assert default_config(environ, installed=True) is None
    settings = load_config(environ=environ, installed=True)
    assert settings.source == BUILT_IN
    assert settings.database == str(tmp_path / "home" / ".local/share/kvapp/kvapp.sqlite3")
    assert (settings.host, settings.port) == ("127.0.0.1", 4000)
    assert not (tmp_path / "home").exists()  # loading creates nothing


def test_installed_reads_the_xdg_config_file_when_it_exists(tmp_path: Path):
    home = tmp_path / "home"
    config = home / ".config" / "kvapp" / "config.ini"
    config.parent.mkdir(parents=True)
    config.write_text("[server]\nport = 4411\n", encoding="utf-8")
    environ = {"HOME": str(home)}
    assert default_config(environ, installed=True) == config
    settings = load_config(environ=environ, installed=True)
    assert (settings.source, settings.port) == (str(config), 4411)
    # A file that does not name the database leaves it in the data folder, not beside the file.
    assert settings.database == str(home / ".local/share/kvapp/kvapp.sqlite3")


def test_installed_follows_xdg_config_home_and_xdg_data_home(tmp_path: Path):
    config = tmp_path / "cfg" / "kvapp" / "config.ini"
    config.parent.mkdir(parents=True)
    config.write_text("[server]\nport = 4412\n", encoding="utf-8")
    environ = {
        "HOME": str(tmp_path / "home"),
        "XDG_CONFIG_HOME": str(tmp_path / "cfg"),
        "XDG_DATA_HOME": str(tmp_path / "data"),
    }
    settings = load_config(environ=environ, installed=True)
    assert (settings.source, settings.port) == (str(config), 4412)
    assert settings.database == str(tmp_path / "data" / "kvapp" / "kvapp.sqlite3")


@pytest.mark.parametrize("value", ["", "relative/cfg"], ids=["empty", "relative"])
def test_installed_ignores_an_empty_or_relative_xdg_variable(tmp_path: Path, value: str):
    """The XDG spec: a relative path in these variables is invalid and ignored."""
    environ = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": value, "XDG_DATA_HOME": value}
    config = tmp_path / ".config" / "kvapp" / "config.ini"
    config.parent.mkdir(parents=True)
    config.write_text("", encoding="utf-8")
    settings = load_config(environ=environ, installed=True)
    assert settings.source == str(config)
    assert settings.database == str(tmp_path / ".local/share/kvapp/kvapp.sqlite3")


def test_installed_relative_database_in_a_file_is_relative_to_that_file(tmp_path: Path):
    config = tmp_path / "home" / ".config" / "kvapp" / "config.ini"
    config.parent.mkdir(parents=True)
    config.write_text("[storage]\ndatabase = db/kv.sqlite3\n", encoding="utf-8")
    settings = load_config(environ={"HOME": str(tmp_path / "home")}, installed=True)
    assert settings.database == str(config.parent / "db" / "kv.sqlite3")


def test_installed_kvapp_config_beats_the_xdg_config_file(tmp_path: Path):
    xdg = tmp_path / ".config" / "kvapp" / "config.ini"
    xdg.parent.mkdir(parents=True)
    xdg.write_text("[server]\nport = 4413\n", encoding="utf-8")
    named = tmp_path / "named.ini"
    named.write_text("[server]\nport = 4414\n", encoding="utf-8")
    environ = {"HOME": str(tmp_path), "KVAPP_CONFIG": str(named)}
    assert default_config(environ, installed=True) == named
    settings = load_config(environ=environ, installed=True)
    assert (settings.source, settings.port) == (str(named), 4414)


def test_installed_missing_kvapp_config_file_is_refused(tmp_path: Path):
    environ = {"HOME": str(tmp_path), "KVAPP_CONFIG": str(tmp_path / "nope.ini")}
    with pytest.raises(ConfigError, match="nope.ini does not exist"):
        load_config(environ=environ, installed=True)


def test_installed_kvapp_database_beats_the_data_folder(tmp_path: Path):
    environ = {"HOME": str(tmp_path), "KVAPP_DATABASE": str(tmp_path / "elsewhere.sqlite3")}
    settings = load_config(environ=environ, installed=True)
    assert settings.database == str(tmp_path / "elsewhere.sqlite3")


def test_installed_relative_kvapp_database_without_a_file_is_relative_to_the_cwd(
    tmp_path: Path,
):
    environ = {"HOME": str(tmp_path), "KVAPP_DATABASE": "here.sqlite3"}
    settings = load_config(environ=environ, installed=True)
    assert settings.database == str(Path.cwd().resolve() / "here.sqlite3")


def test_the_startup_line_names_the_config_file_or_says_there_is_none(tmp_path: Path):
    assert describe_config("/etc/kvapp.ini", {}) == "config /etc/kvapp.ini"
    note = describe_config(BUILT_IN, {"HOME": str(tmp_path)})
    assert note == (
        f"config built-in defaults (no {tmp_path}/.config/kvapp/config.ini, no KVAPP_CONFIG)"
    )


# -- an installed kvapp, end to end ---------------------------------------------

# Left out of the copy the wheel is built from: what a developer's checkout
# holds beside the sources (a venv, databases, caches, earlier builds).
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "data", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
)


def run_ok(command: list[str | Path], **options) -> subprocess.CompletedProcess:
    """Run command to its end; fail the test with its stderr unless it exits 0."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, **options)
    assert done.returncode == 0, f"{command} exited {done.returncode}: {done.stderr}"
    return done


def build_wheel(tmp_path: Path) -> Path:
    """Build kvapp's wheel from a copy of this checkout; return its path.

    A copy, because setuptools writes build/ and kvapp.egg-info/ into the tree
    it builds, and an earlier build/ could carry stale files into the wheel.
    """
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCES)
    wheels = tmp_path / "wheels"
    run_ok([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", wheels, source])
    (wheel,) = wheels.glob("kvapp-*.whl")
    return wheel


def user_environ(tmp_path: Path) -> dict[str, str]:
    """The environment of a user whose home and XDG folders are under tmp_path."""
    drop = ("KVAPP_", "XDG_", "PYTHON", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return {
        **env,
        "HOME": str(tmp_path / "home"),
        "XDG_CONFIG_HOME": str(tmp_path / "xdg-config"),
        "XDG_DATA_HOME": str(tmp_path / "xdg-data"),
    }


def start(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple:
    """Start `kvapp serve`; return (process, port, its two startup lines)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = log.read_text(encoding="utf-8")
            if text.count("\n") >= 2:
                lines = text.splitlines()[:2]
                match = re.search(r" on http://127\.0\.0\.1:(\d+) ", lines[0])
                assert match, lines
                return proc, int(match.group(1)), lines
            assert proc.poll() is None, text
            time.sleep(0.05)
        raise AssertionError(f"kvapp serve printed no startup lines: {text}")
    except BaseException:
        proc.kill()
        proc.wait(timeout=15)
        raise


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0


@pytest.mark.slow
def test_pip_installed_kvapp_serves_with_xdg_defaults(tmp_path: Path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "kvapp/web/openapi.json" in names
    assert {"kvapp/store/sqlite.py", "kvapp/tools/commands.py", "kvapp/__main__.py"} <= set(names)
    # Only the package and its metadata: no tests/, bench/, config.ini or wsgi.py.
    assert all(name.startswith(("kvapp/", "kvapp-0.1.0.dist-info/")) for name in names), names

    venv = tmp_path / "venv"
    run_ok([sys.executable, "-m", "venv", venv])
    # waitress, tqdm and typing_extensions come from the package index.
    run_ok([venv / "bin" / "python", "-m", "pip", "install", "-q", wheel])
    env = user_environ(tmp_path)
    run = tmp_path / "run"  # an empty working directory: no config.ini, no kvapp/
    run.mkdir()
    kvapp = str(venv / "bin" / "kvapp")
    where = run_ok(
        [venv / "bin" / "python", "-c", "import kvapp; print(kvapp.__file__)"], cwd=run, env=env
    )
    assert where.stdout.startswith(str(venv / "lib")), where.stdout  # not this checkout's

    for command in ("", "serve", "backup", "export", "import", "copy", "check", "stats"):
        shown = run_ok([kvapp, *command.split(), "--help"], cwd=run, env=env)
        assert shown.stdout.startswith(f"usage: kvapp {command}".rstrip() + " "), shown.stdout

    # No config file anywhere: built-in defaults, the database under XDG_DATA_HOME.
    database = tmp_path / "xdg-data" / "kvapp" / "kvapp.sqlite3"
    user_config = tmp_path / "xdg-config" / "kvapp" / "config.ini"
    proc, port, lines = start([kvapp, "serve", "--port", "0"], run, env, tmp_path / "one.log")
    try:
        assert lines == [
            f"kvapp: serving {database} on http://127.0.0.1:{port} with 1 worker",
            f"kvapp: config built-in defaults (no {user_config}, no KVAPP_CONFIG)",
        ]
        assert curl(f"http://127.0.0.1:{port}/set?greeting=installed")[0] == 200
        assert curl(f"http://127.0.0.1:{port}/get?key=greeting")[::2] == (200, b"installed")
    finally:
        stop(proc)
    assert database.is_file()
    assert list(run.iterdir()) == []  # nothing written to the working directory

    # A config file in XDG_CONFIG_HOME is read; it names no database, so the same one serves.
    user_config.parent.mkdir(parents=True)
    user_config.write_text("[server]\nport = 0\n", encoding="utf-8")
    proc, port, lines = start([kvapp, "serve"], run, env, tmp_path / "two.log")
    try:
        assert lines == [
            f"kvapp: serving {database} on http://127.0.0.1:{port} with 1 worker",
            f"kvapp: config {user_config}",
        ]
        assert curl(f"http://127.0.0.1:{port}/get?key=greeting")[::2] == (200, b"installed")
    finally:
        stop(proc)

    # The data tools find the same database.
    figures = json.loads(run_ok([kvapp, "stats", "--json"], cwd=run, env=env).stdout)
    assert (figures["database"], figures["keys"]) == (str(database), 1)
