"""Where the defaults live: a checkout's config.ini, or an installed kvapp's XDG folders.

From a checkout kvapp reads the config.ini beside it; installed, it follows the
XDG Base Directory Specification (kvapp/config.py, docs/install.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import ROOT

from kvapp.config import (
    BUILT_IN,
    CHECKOUT_CONFIG,
    ConfigError,
    default_config,
    describe_config,
    is_checkout,
    load_config,
)

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
