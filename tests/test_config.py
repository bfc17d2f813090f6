"""config.ini, the environment and the command line -> one validated Settings."""

from __future__ import annotations

import configparser
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
from helpers import ROOT, curl, free_port

from kvapp.__main__ import _command_line_database
from kvapp.config import SETTINGS, ConfigError, Settings, load_config

CONFIG_INI = ROOT / "config.ini"


def write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without any KVAPP_* variable, plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVAPP_")}
    return {**env, **extra}


def one_line(message: str) -> str:
    assert message and "\n" not in message.rstrip("\n"), message
    return message


# -- defaults and config.ini ---------------------------------------------------


def test_config_ini_defaults_load():
    settings = load_config(CONFIG_INI, environ={})
    assert settings.database == str(ROOT / "data" / "kvapp.sqlite3")
    assert (settings.host, settings.port, settings.threads) == ("127.0.0.1", 4000, 16)
    assert settings.max_key_bytes == 1024
    assert settings.max_value_bytes == 1024 * 1024
    assert settings.synchronous == "FULL"
    assert settings.busy_timeout_ms > 0
    assert settings.max_body_bytes >= 3 * settings.max_value_bytes  # a %-encoded max value fits
    assert settings.source == str(CONFIG_INI)


def test_config_ini_says_what_the_settings_table_says(tmp_path: Path):
    """An empty file gives the SETTINGS defaults; config.ini must give the same."""
    empty = load_config(write_config(tmp_path / "config.ini", ""), environ={})
    shipped = load_config(CONFIG_INI, environ={})
    for field in fields(Settings):
        if field.name in ("database", "source"):
            continue
        assert getattr(shipped, field.name) == getattr(empty, field.name), field.name
    assert Path(empty.database) == tmp_path / "data" / "kvapp.sqlite3"


def test_every_setting_appears_commented_in_config_ini():
    lines = CONFIG_INI.read_text(encoding="utf-8").splitlines()
    section = None
    found: dict[tuple[str, str], tuple[str, bool]] = {}
    for number, line in enumerate(lines):
        if match := re.fullmatch(r"\[(\w+)\]", line.strip()):
            section = match.group(1)
        elif match := re.fullmatch(r"(\w+)\s*=\s*(.*)", line.strip()):
            commented = number > 0 and lines[number - 1].lstrip().startswith(("#", ";"))
            found[(section, match.group(1))] = (match.group(2).strip(), commented)
    declared = {(section, name): default for section, name, _, default, _ in SETTINGS}
    assert set(found) == set(declared)
    for key, default in declared.items():
        value, commented = found[key]
        assert commented, f"[{key[0]}] {key[1]} has no comment above it"
        assert value == default, f"[{key[0]}] {key[1]}: config.ini says {value}, SETTINGS {default}"


def test_settings_table_and_settings_class_agree():
    assert {name for _, name, *_ in SETTINGS} == {
        f.name for f in fields(Settings) if f.name != "source"
    }
    for _, _, convert, default, help_text in SETTINGS:
        convert(default)  # every default passes its own converter
        assert help_text


# -- precedence: file < environment < command line ------------------------------


def test_relative_database_is_relative_to_the_config_file(tmp_path: Path, monkeypatch):
    config = write_config(tmp_path / "etc" / "kv.ini", "[storage]\ndatabase = db/store.sqlite3\n")
    monkeypatch.chdir(tmp_path)  # not the config file's folder
    settings = load_config(config, environ={})
    assert settings.database == str(tmp_path / "etc" / "db" / "store.sqlite3")


def test_absolute_database_path_is_kept(tmp_path: Path):
    target = tmp_path / "elsewhere" / "x.sqlite3"
    config = write_config(tmp_path / "kv.ini", f"[storage]\ndatabase = {target}\n")
    assert load_config(config, environ={}).database == str(target)


def test_kvapp_database_overrides_the_file(tmp_path: Path):
    config = write_config(tmp_path / "kv.ini", "[storage]\ndatabase = from-file.sqlite3\n")
    target = tmp_path / "from-env.sqlite3"
    settings = load_config(config, environ={"KVAPP_DATABASE": str(target)})
    assert settings.database == str(target)


def test_kvapp_config_names_another_file(tmp_path: Path):
    config = write_config(tmp_path / "other.ini", "[server]\nport = 4321\nthreads = 7\n")
    settings = load_config(environ={"KVAPP_CONFIG": str(config)})
    assert (settings.port, settings.threads) == (4321, 7)
    assert settings.source == str(config)
    assert settings.database == str(tmp_path / "data" / "kvapp.sqlite3")


def test_environment_beats_file_and_options_beat_both(tmp_path: Path):
    config = write_config(tmp_path / "kv.ini", "[server]\nport = 1111\nthreads = 2\n")
    env = {"KVAPP_PORT": "2222", "KVAPP_THREADS": "3"}
    assert load_config(config, environ=env).port == 2222
    settings = load_config(config, environ=env, port=3333)
    assert (settings.port, settings.threads) == (3333, 3)


def test_every_setting_can_come_from_the_environment(tmp_path: Path):
    config = write_config(tmp_path / "kv.ini", "")
    for _, name, convert, default, _ in SETTINGS:
        settings = load_config(config, environ={f"KVAPP_{name.upper()}": default})
        if name != "database":
            assert getattr(settings, name) == convert(default)


# -- rejected configuration ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[storage]\nfoo = 1\n", "foo"),
        ("[bogus]\nport = 1\n", "bogus"),
        ("[server]\ndatabase = x.sqlite3\n", "database"),  # right name, wrong section
        ("[DEFAULT]\nport = 1\n", "DEFAULT"),
        ("[limits]\nmax_key_byte = 10\n", "max_key_byte"),
    ],
    ids=["unknown-name", "unknown-section", "wrong-section", "default-section", "typo"],
)
def test_unknown_setting_in_file_is_refused(tmp_path: Path, text: str, words: str):
    config = write_config(tmp_path / "kv.ini", text)
    with pytest.raises(ConfigError) as caught:
        load_config(config, environ={})
    message = one_line(str(caught.value))
    assert "unknown setting" in message and words in message and str(config) in message


# KVAPP_port beside KVAPP_PORT: the environment's order would choose.
@pytest.mark.parametrize("name", ["KVAPP_FOO", "KVAPP_MAX_KEY", "KVAPP_", "KVAPP_port"])
def test_unknown_setting_in_environment_is_refused(tmp_path: Path, name: str):
    config = write_config(tmp_path / "kv.ini", "")
    with pytest.raises(ConfigError) as caught:
        load_config(config, environ={name: "1"})
    assert name in one_line(str(caught.value))


def test_other_environment_variables_are_ignored(tmp_path: Path):
    config = write_config(tmp_path / "kv.ini", "")
    settings = load_config(config, environ={"PORT": "1", "XKVAPP_PORT": "2", "kvapp_port": "3"})
    assert settings.port == 4000


BAD_VALUES = [
    ("storage", "busy_timeout_ms", "soon"),
    ("storage", "busy_timeout_ms", "-1"),
    ("storage", "busy_timeout_ms", "600001"),
    ("storage", "synchronous", "OFF"),
    ("storage", "synchronous", ""),
    ("storage", "startup_check_max_bytes", "1.5"),
    ("storage", "database", ""),
    ("limits", "max_key_bytes", "0"),
    ("limits", "max_key_bytes", "1k"),
    # int() reads these, and a config file should not mean them.
    ("limits", "max_key_bytes", "1_024"),
    ("limits", "max_key_bytes", "\u0661\u0660\u0662\u0664"),
    ("limits", "max_key_bytes", "+1024"),
    ("limits", "max_value_bytes", "-5"),
    ("limits", "max_body_bytes", "lots"),
    ("server", "port", "65536"),
    ("server", "port", "http"),
    ("server", "threads", "0"),
    ("server", "connection_limit", "0"),
    ("server", "channel_timeout", "0"),
    ("server", "max_request_header_size", "10"),
    ("proxy", "trusted_proxy", "*"),
    ("proxy", "trusted_proxy", "localhost"),
    ("proxy", "trusted_proxy", "127.0.0.1:80"),
    ("proxy", "trusted_proxy", "10.0.0.0/8"),
    ("proxy", "trusted_proxy_headers", ""),
    ("proxy", "trusted_proxy_headers", "x-real-ip"),
    ("proxy", "trusted_proxy_headers", "forwarded x-forwarded-for"),
    # Either would let a client choose the Host that allowed_hosts checks.
    ("proxy", "trusted_proxy_headers", "x-forwarded-for x-forwarded-host"),
    ("proxy", "trusted_proxy_headers", "forwarded"),
    ("proxy", "trusted_proxy_count", "0"),
]


@pytest.mark.parametrize(("section", "name", "bad"), BAD_VALUES)
def test_bad_value_in_file_is_refused(tmp_path: Path, section: str, name: str, bad: str):
    config = write_config(tmp_path / "kv.ini", f"[{section}]\n{name} = {bad}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config, environ={})
    assert name in one_line(str(caught.value))


@pytest.mark.parametrize(("section", "name", "bad"), BAD_VALUES)
def test_bad_value_in_environment_is_refused(tmp_path: Path, section: str, name: str, bad: str):
    config = write_config(tmp_path / "kv.ini", "")
    with pytest.raises(ConfigError) as caught:
        load_config(config, environ={f"KVAPP_{name.upper()}": bad})
    message = one_line(str(caught.value))
    assert name in message
    if bad:  # an empty database is refused after conversion, without its origin
        assert f"KVAPP_{name.upper()}" in message


@pytest.mark.parametrize(
    ("threads", "max_watchers", "refused"), [(16, 16, True), (8, 20, True), (16, 15, False)]
)
def test_max_watchers_must_stay_below_threads(tmp_path: Path, threads, max_watchers, refused):
    config = write_config(tmp_path / "kv.ini", f"[server]\nthreads = {threads}\n")
    environ = {"KVAPP_MAX_WATCHERS": str(max_watchers)}
    if not refused:
        assert load_config(config, environ=environ).watcher_limit == max_watchers
        return
    with pytest.raises(ConfigError) as caught:
        load_config(config, environ=environ)
    assert one_line(str(caught.value)) == (
        f"bad value for max_watchers (environment variable KVAPP_MAX_WATCHERS): {max_watchers}"
        f" is not below threads ({threads}): watchers would hold every thread;"
        " raise threads or lower max_watchers"
    )


# Every setting whose converter is asint(...): a count, a size or a port.
WHOLE_NUMBERS = [
    (section, name)
    for section, name, convert, _, _ in SETTINGS
    if convert.__qualname__.startswith("asint.")
]


def test_the_whole_number_settings_are_found():
    """They are the settings whose default is a number."""
    numbers = {name for _, name, _, default, _ in SETTINGS if default.isdigit()}
    assert {name for _, name in WHOLE_NUMBERS} == numbers
    assert "port" in numbers


@pytest.mark.parametrize("bad", ["soon", "1.5", "4k", "0x10", ""])
@pytest.mark.parametrize(("section", "name"), WHOLE_NUMBERS)
def test_a_whole_number_setting_says_so_when_it_is_not_one(
    tmp_path: Path, section: str, name: str, bad: str
):
    config = write_config(tmp_path / "kv.ini", f"[{section}]\n{name} = {bad}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config, environ={})
    assert one_line(str(caught.value)) == (
        f"bad value for {name} ({config} [{section}] {name}): must be a whole number, got {bad!r}"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(
            write_config(tmp_path / "empty.ini", ""), environ={f"KVAPP_{name.upper()}": bad}
        )
    assert str(caught.value) == (
        f"bad value for {name} (environment variable KVAPP_{name.upper()}):"
        f" must be a whole number, got {bad!r}"
    )


def test_inline_comments_are_not_part_of_the_value(tmp_path: Path):
    config = write_config(
        tmp_path / "kv.ini",
        "[storage]\n"
        "database = data/kv#1.sqlite3  ; a '#' with no space before it is part of the value\n"
        "[server]\n"
        "port = 4411  # my port\n"
        "threads = 8\t; eight\n"
        "[proxy]\n"
        "trusted_proxy = 127.0.0.1   # in [proxy]\n"
        "[security]\n"
        "allowed_hosts = localhost kv.example.com # and nothing else\n",
    )
    settings = load_config(config, environ={})
    assert settings.port == 4411
    assert settings.threads == 8
    assert settings.trusted_proxy == "127.0.0.1"
    assert settings.allowed_hosts == ("localhost", "kv.example.com")
    assert settings.database == str(tmp_path / "data" / "kv#1.sqlite3")


@pytest.mark.parametrize(("name", "bad"), [("port", 70000), ("threads", 0), ("port", -1)])
def test_bad_command_line_value_is_refused(tmp_path: Path, name: str, bad: int):
    config = write_config(tmp_path / "kv.ini", "")
    with pytest.raises(ConfigError) as caught:
        load_config(config, environ={}, **{name: bad})
    assert name in one_line(str(caught.value))


@pytest.mark.parametrize(
    "text",
    ["port = 1\n", "[server]\nport = 1\nport = 2\n", "[server\nport = 1\n", "\xff"],
    ids=["no-section", "duplicate", "broken-header", "not-utf8"],
)
def test_unreadable_config_file_is_refused(tmp_path: Path, text: str):
    config = tmp_path / "kv.ini"
    config.write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        load_config(config, environ={})
    assert str(config) in one_line(str(caught.value))


def test_missing_config_file_is_refused(tmp_path: Path):
    with pytest.raises(ConfigError) as caught:
        load_config(environ={"KVAPP_CONFIG": str(tmp_path / "nope.ini")})
    assert str(tmp_path / "nope.ini") in one_line(str(caught.value))


# -- startup through the real entry points -------------------------------------


def run_entry_point(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


WAITRESS = [str(Path(sys.executable).with_name("waitress-serve")), "--listen=127.0.0.1:0"]
MODULE = [sys.executable, "-m", "kvapp", "serve", "--port=0"]


@pytest.mark.parametrize("entry", [WAITRESS, MODULE], ids=["waitress-serve", "python-m-kvapp"])
@pytest.mark.parametrize(
    ("variables", "words"),
    [
        ({"KVAPP_FOO": "1"}, "KVAPP_FOO"),
        ({"KVAPP_MAX_KEY_BYTES": "many"}, "max_key_bytes"),
        ({"KVAPP_CONFIG": "/nonexistent/kvapp.ini"}, "/nonexistent/kvapp.ini"),
    ],
    ids=["unknown", "bad-value", "missing-file"],
)
def test_bad_configuration_stops_startup_with_one_line(
    entry: list[str], variables: dict[str, str], words: str, tmp_path: Path
):
    command = [*entry, "wsgi:app"] if entry is WAITRESS else entry
    env = clean_env(KVAPP_DATABASE=str(tmp_path / "kv.sqlite3"), **variables)
    result = run_entry_point(command, env)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1, result.stderr
    assert words in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "kv.sqlite3").exists()


@pytest.mark.parametrize("option", ["--port=70000", "--threads=0"])
def test_bad_command_line_option_stops_serve_with_one_line(option: str, tmp_path: Path):
    env = clean_env(KVAPP_DATABASE=str(tmp_path / "kv.sqlite3"))
    result = run_entry_point([sys.executable, "-m", "kvapp", "serve", option], env)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert option.split("=")[0].lstrip("-") in result.stderr


@pytest.mark.parametrize("value", ["data/", "~nosuchuser9/kv.sqlite3"])
def test_serve_s_database_option_is_checked_as_the_setting_is(value: str, tmp_path: Path):
    env = clean_env(HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "kvapp", "serve", "--port=0", f"--database={value}"]
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("kvapp: bad value for database (--database): ")
    assert value in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_serve_s_database_option_expands_a_tilde(tmp_path: Path):
    database = _command_line_database("~/kv/x.sqlite3")  # as --database=~/kv/x.sqlite3 gives it
    settings = load_config(CONFIG_INI, environ={"HOME": str(tmp_path)}, database=database)
    assert settings.database == str(tmp_path / "kv" / "x.sqlite3")


def listening_addresses(port: int) -> set[str]:
    """Return the local addresses with a TCP socket listening on port (Linux /proc)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            next(handle)
            for line in handle:
                local, state = line.split()[1], line.split()[3]
                address, _, hex_port = local.partition(":")
                if state == "0A" and int(hex_port, 16) == port:
                    if len(address) == 8:
                        found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
                    else:
                        found.add(address)
    return found


@pytest.fixture
def kvapp_serve():
    """Start `python -m kvapp serve --port P` with an environment; stop it at teardown."""
    procs: list[subprocess.Popen] = []

    def start(env: dict[str, str]) -> tuple[subprocess.Popen, int]:
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvapp", "serve", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        procs.append(proc)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return proc, port
            except OSError:
                time.sleep(0.05)
        raise AssertionError("python -m kvapp serve did not start listening")

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        proc.stderr.close()


def test_python_m_kvapp_serve_listens_on_loopback_and_serves(tmp_path: Path, kvapp_serve):
    config = write_config(tmp_path / "conf" / "kv.ini", "[storage]\ndatabase = new/dir/kv.db\n")
    database = tmp_path / "conf" / "new" / "dir" / "kv.db"
    assert not database.parent.exists()
    proc, port = kvapp_serve(clean_env(KVAPP_CONFIG=str(config)))
    assert database.is_file()  # the file and its folder are created on first start
    assert listening_addresses(port) == {"127.0.0.1"}
    url = f"http://127.0.0.1:{port}"
    assert curl(f"{url}/set?greeting=hello%20world")[0] == 200
    status, headers, body = curl(f"{url}/get?key=greeting")
    assert (status, body) == (200, b"hello world")
    assert headers["content-type"] == "text/plain; charset=utf-8"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=15)
    first_line = proc.stderr.readline().decode()
    assert str(database) in first_line and f"127.0.0.1:{port}" in first_line
    assert proc.stderr.readline().decode() == f"kvapp: config {config.resolve()}\n"


def test_python_m_kvapp_serve_uses_kvapp_database(tmp_path: Path, kvapp_serve):
    database = tmp_path / "made" / "here.sqlite3"
    _, port = kvapp_serve(clean_env(KVAPP_DATABASE=str(database)))
    assert database.is_file()
    assert curl(f"http://127.0.0.1:{port}/set?a=1")[0] == 200
    assert curl(f"http://127.0.0.1:{port}/get?key=a")[2] == b"1"


def test_default_config_file_is_the_one_beside_the_package(tmp_path: Path):
    """wsgi.py's load_config() finds config.ini from any working directory."""
    code = "from kvapp.config import load_config; s = load_config(); print(s.source, s.database)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=clean_env(PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(CONFIG_INI), str(ROOT / "data" / "kvapp.sqlite3")]


def test_configparser_reads_config_ini_without_error():
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(CONFIG_INI, encoding="utf-8")
    assert set(parser.sections()) == {section for section, *_ in SETTINGS}


def test_python_m_kvapp_serve_refuses_a_body_over_max_body_bytes(tmp_path: Path, kvapp_serve):
    """serve passes max_body_bytes to waitress, which answers 413 from Content-Length
    alone, before reading the body or calling kvapp (so with waitress's own headers)."""
    database = tmp_path / "kv.sqlite3"
    _, port = kvapp_serve(clean_env(KVAPP_DATABASE=str(database), KVAPP_MAX_BODY_BYTES="100"))
    url = f"http://127.0.0.1:{port}/set"
    status, _, _ = curl("--data-binary", "@-", url, data=b"big=" + b"x" * 97)
    assert status == 413
    status, _, body = curl("--data-binary", "@-", url, data=b"big=" + b"x" * 96)
    assert (status, body) == (200, b"stored 1 key\n")
    status, _, body = curl(f"http://127.0.0.1:{port}/get?key=big")
    assert body == b"x" * 96


@pytest.mark.parametrize("setting", ["database", "metrics_path", "config"])
def test_a_loop_of_symbolic_links_is_refused_naming_the_setting(tmp_path: Path, setting: str):
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    loop = str(tmp_path / "loop1")
    if setting == "config":
        config, named = Path(loop), "the config file"
    else:
        config = write_config(tmp_path / "kv.ini", f"[storage]\n{setting} = {loop}\n")
        named = f"{setting} ({config} [storage] {setting})"
    with pytest.raises(ConfigError) as caught:
        load_config(config, environ={})
    assert one_line(str(caught.value)).startswith(f"bad value for {named}: {loop} cannot be")


@pytest.mark.parametrize("setting", ["database", "metrics_path"])
def test_a_leading_tilde_is_the_home_folder(tmp_path: Path, setting: str):
    home = tmp_path / "home"
    config = write_config(tmp_path / "etc" / "kv.ini", f"[storage]\n{setting} = ~/kv/x.sqlite3\n")
    settings = load_config(config, environ={"HOME": str(home)})
    assert getattr(settings, setting) == str(home / "kv" / "x.sqlite3")
    user = pwd.getpwuid(os.getuid())  # whoever runs the tests: ~name is their home
    env = {f"KVAPP_{setting.upper()}": f"~{user.pw_name}/x.sqlite3"}
    expected = Path(user.pw_dir).resolve() / "x.sqlite3"
    assert getattr(load_config(config, environ=env), setting) == str(expected)


@pytest.mark.parametrize("setting", ["database", "metrics_path"])
def test_a_tilde_of_an_unknown_user_is_refused(tmp_path: Path, setting: str):
    config = write_config(tmp_path / "kv.ini", f"[storage]\n{setting} = ~nosuchuser9/x\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config, environ={})
    assert one_line(str(caught.value)) == (
        f"bad value for {setting} ({config} [storage] {setting}): ~nosuchuser9/x:"
        " there is no user 'nosuchuser9'"
    )


@pytest.mark.parametrize("setting", ["database", "metrics_path"])
@pytest.mark.parametrize("value", ["data/", "existing", "existing/.", "~/"])
def test_a_folder_is_refused_where_a_file_is_due(tmp_path: Path, setting: str, value: str):
    # Resolving drops a trailing slash: `database = data/` made a file named data.
    (tmp_path / "existing").mkdir()
    config = write_config(tmp_path / "kv.ini", f"[storage]\n{setting} = {value}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config, environ={"HOME": str(tmp_path)})
    message = one_line(str(caught.value))
    assert message.startswith(f"bad value for {setting} ({config} [storage] {setting}): ")
    assert re.search(r" (names a folder: add a file name|is a folder: name a file in it)$", message)
    assert not (tmp_path / "data").exists()


def test_an_empty_kvapp_config_is_refused_rather_than_ignored():
    # Set but empty is a mistake (an unset variable expanded), not a choice:
    # falling back to another file would serve a database nobody meant.
    with pytest.raises(ConfigError) as caught:
        load_config(environ={"KVAPP_CONFIG": ""})
    assert one_line(str(caught.value)) == "KVAPP_CONFIG is empty: name a config file, or unset it"
