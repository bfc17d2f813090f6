"""Settings: config.ini and the environment -> one validated Settings object.

Every setting is declared once in SETTINGS as (section, name, converter,
default, help).  config.ini holds strings; each converter turns one into a
value or raises ValueError.  KVAPP_<NAME> in the environment overrides the
file, and KVAPP_CONFIG names another config file.

Where the defaults live depends on how kvapp runs.  From a checkout (config.ini
beside the kvapp package's folder) the config file is that config.ini and the
database data/kvapp.sqlite3 beside it.  Installed (pip install), kvapp follows
the XDG Base Directory Specification: the config file is
$XDG_CONFIG_HOME/kvapp/config.ini if it exists, else there is none and the
built-in defaults apply; the database is $XDG_DATA_HOME/kvapp/kvapp.sqlite3.
docs/install.md tells the same to users.
"""

from __future__ import annotations

import configparser
import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvapp.store.location import (
    LocationError,
    check_location,
    file_path,
    is_postgres_url,
    resolved,
)
from kvapp.web.guard import parse_allowed_hosts, parse_token

ROOT = Path(__file__).resolve().parent.parent
# In a checkout, config.ini sits beside the kvapp package; an installed kvapp's
# ROOT is site-packages, which holds none.
CHECKOUT_CONFIG = ROOT / "config.ini"
# Settings.source when no config file was read.
BUILT_IN = "built-in defaults"


class ConfigError(Exception):
    """A config file or environment value that cannot be used; the message is one line."""


def asbool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def asint(minimum: int, maximum: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        digits = text.strip()
        # int() also takes "1_000", "+5" and other scripts' digits ("٤٠٠٠").
        if not (digits.isascii() and digits.lstrip("-").isdigit()) or len(digits) > 30:
            raise ValueError(f"must be a whole number, got {digits!r}")
        value = int(digits)
        if not minimum <= value <= maximum:
            raise ValueError(f"must be between {minimum} and {maximum}, got {value}")
        return value

    return convert


def aschoice(*choices: str) -> Callable[[str], str]:
    def convert(text: str) -> str:
        value = text.strip().upper()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {text!r}")
        return value

    return convert


def aslist(text: str) -> tuple[str, ...]:
    return tuple(text.split())


def asstr(text: str) -> str:
    return text.strip()


def aswatchers(text: str) -> int | None:
    """Return max_watchers: a whole number, or None for auto (half of threads)."""
    if text.strip().lower() == "auto":
        return None
    return asint(0, 100_000)(text)


def aslevel(text: str) -> str:
    return aschoice("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")(text)


def asproxy(text: str) -> str:
    """Return the proxy's IP address as waitress sees it in REMOTE_ADDR, or '' for none."""
    text = text.strip()
    if not text:
        return ""
    if text == "*":
        # waitress would then believe X-Forwarded-For from every client.
        raise ValueError("name the proxy's address; * would trust every client")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"expected the proxy's IP address, got {text!r}") from None


# The headers waitress can take from a trusted proxy (adjustments.KNOWN_PROXY_HEADERS)
# that kvapp lets it take.  Not x-forwarded-host, nor forwarded (whose host=
# waitress takes too): waitress would put the forwarded host in HTTP_HOST,
# which the Host allow-list checks, so any client of the proxy (a page after
# DNS rebinding included) could name an allowed host there and pass.
PROXY_HEADERS = frozenset(
    ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-port", "x-forwarded-by")
)
HOST_HEADERS = frozenset(("x-forwarded-host", "forwarded"))


def asproxyheaders(text: str) -> tuple[str, ...]:
    """Return the lower-cased header names; raise ValueError for an unknown or empty list."""
    headers = tuple(dict.fromkeys(text.lower().split()))
    if not headers:
        raise ValueError("name at least one header; leave trusted_proxy empty to trust none")
    for header in headers:
        if header in HOST_HEADERS:
            raise ValueError(
                f"{header} would let a client choose the Host that allowed_hosts checks;"
                f" trust {' '.join(sorted(PROXY_HEADERS))} (the proxy passes Host itself)"
            )
        if header not in PROXY_HEADERS:
            raise ValueError(f"unknown {header!r}; known: {' '.join(sorted(PROXY_HEADERS))}")
    return headers


_KIB = 1024
_MIB = 1024 * _KIB

# (section, name, converter, default as it would be written in config.ini, help)
SETTINGS: tuple[tuple[str, str, Callable[[str], Any], str, str], ...] = (
    (
        "storage",
        "database",
        asstr,
        "data/kvapp.sqlite3",
        "SQLite file (relative to the config file's folder), or a postgresql:// URL",
    ),
    (
        "storage",
        "busy_timeout_ms",
        asint(0, 600_000),
        "5000",
        "how long a write waits for a lock held by another process (or kvapp host) before 503",
    ),
    (
        "storage",
        "database_timeout_seconds",
        asint(1, 3600),
        "10",
        "PostgreSQL: longest wait for any answer of the server; then 503 (outcome unknown"
        " if the commit was sent)",
    ),
    (
        "storage",
        "synchronous",
        aschoice("FULL", "NORMAL"),
        "FULL",
        "FULL: every acknowledged write is on disk; NORMAL: may lose the last writes on power loss"
        " (PostgreSQL: synchronous_commit on / off)",
    ),
    (
        "storage",
        "startup_check_max_bytes",
        asint(0, 2**62),
        str(256 * _MIB),
        "run PRAGMA quick_check at start when the database is at most this big",
    ),
    (
        "storage",
        "read_cache_bytes",
        asint(0, 2**40),
        str(32 * _MIB),
        "bytes of recently read values each worker process keeps in memory (SQLite); 0: none",
    ),
    (
        "storage",
        "sweep_interval_seconds",
        asint(0, 86_400),
        "60",
        "how often expired keys' rows are removed in the background; 0: never",
    ),
    (
        "storage",
        "metrics_path",
        asstr,
        "",
        "file the worker processes add their metrics to; empty: see kvapp.store.metricsfile",
    ),
    (
        "limits",
        "max_key_bytes",
        asint(1, 65_536),
        "1024",
        "longest key, in bytes of UTF-8 (400 beyond)",
    ),
    (
        "limits",
        "max_value_bytes",
        asint(0, 512 * _MIB),
        str(1 * _MIB),
        "longest value, in bytes (413 beyond)",
    ),
    (
        "limits",
        "max_body_bytes",
        asint(0, 2 * 1024 * _MIB),
        str(4 * _MIB),
        "largest request body, refused with 413 before it is read",
    ),
    (
        "limits",
        "max_txn_ops",
        asint(1, 10_000),
        "128",
        "most conditions, and most operations in each branch, of one POST /txn (400 beyond)",
    ),
    (
        "server",
        "host",
        asstr,
        "127.0.0.1",
        "address the run command listens on; 0.0.0.0 exposes the server to the network",
    ),
    ("server", "port", asint(0, 65_535), "4000", "port the run command listens on"),
    ("server", "threads", asint(1, 256), "16", "waitress worker threads"),
    (
        "server",
        "workers",
        asint(1, 64),
        "1",
        "processes of the run command serving one socket and one database",
    ),
    (
        "server",
        "connection_limit",
        asint(1, 100_000),
        "2048",
        "client connections waitress holds at once; more wait in the listen queue",
    ),
    (
        "server",
        "channel_timeout",
        asint(1, 3600),
        "30",
        "seconds a silent connection stays open, or one whose client takes no byte of its"
        " answer (one that trickles bytes is never closed)",
    ),
    (
        "server",
        "max_request_header_size",
        asint(1024, 1 * _MIB),
        str(64 * _KIB),
        "largest request line plus headers (431 beyond)",
    ),
    (
        "proxy",
        "trusted_proxy",
        asproxy,
        "",
        "IP address of the reverse proxy whose forwarded headers waitress believes; empty: none",
    ),
    (
        "proxy",
        "trusted_proxy_headers",
        asproxyheaders,
        "x-forwarded-for x-forwarded-proto",
        "headers taken from trusted_proxy: the client address and the scheme it used",
    ),
    (
        "proxy",
        "trusted_proxy_count",
        asint(1, 16),
        "1",
        "proxies in a row in front of kvapp; X-Forwarded-For entries beyond them are ignored",
    ),
    (
        "security",
        "allowed_hosts",
        parse_allowed_hosts,
        "localhost 127.0.0.1 [::1]",
        "Host names served, any port (400 otherwise); .example.com adds subdomains; * any",
    ),
    (
        "security",
        "auth_token",
        parse_token,
        "",
        "when set, every request but /healthz needs Authorization: Bearer <token> (401)",
    ),
    (
        "watch",
        "watch_history_seconds",
        asint(0, 10 * 365 * 86_400),
        "3600",
        "how long the change log keeps each change for watchers to resume from (410 beyond)",
    ),
    (
        "watch",
        "watch_history_max",
        asint(0, 2**40),
        "100000",
        "most changes the change log keeps; older ones go first",
    ),
    (
        "watch",
        "watch_heartbeat_seconds",
        asint(1, 3600),
        "15",
        "seconds between keep-alive comments on an idle watch stream",
    ),
    (
        "watch",
        "max_watchers",
        aswatchers,
        "auto",
        "watch streams and long-polls each process serves at once (503 beyond);"
        " auto: half of threads",
    ),
    (
        "watch",
        "max_wait_seconds",
        asint(0, 3600),
        "60",
        "longest Prefer: wait a long-poll may ask for",
    ),
    ("logging", "log_level", aslevel, "INFO", "level of kvapp's log records, the access log aside"),
    (
        "logging",
        "access_log",
        asbool,
        "on",
        "one log line per request (logger kvapp.access), whatever log_level",
    ),
)

_BY_NAME = {name: (section, convert, default) for section, name, convert, default, _ in SETTINGS}


def is_checkout(checkout_config: Path = CHECKOUT_CONFIG) -> bool:
    """Return True when kvapp runs from a checkout: config.ini beside the package's folder."""
    return checkout_config.is_file()


def xdg_home(environ: Mapping[str, str], variable: str, fallback: str) -> Path:
    """Return the folder $variable names, or ~/fallback when it is unset, empty or relative.

    The XDG Base Directory Specification: "If an implementation encounters a
    relative path in any of these variables it should consider the path
    invalid and ignore it."
    """
    value = environ.get(variable, "")
    if os.path.isabs(value):
        return Path(value)
    return Path(environ.get("HOME") or os.path.expanduser("~")) / fallback


def user_config(environ: Mapping[str, str]) -> Path:
    """Return where an installed kvapp looks for its config file: ~/.config/kvapp/config.ini."""
    return xdg_home(environ, "XDG_CONFIG_HOME", ".config") / "kvapp" / "config.ini"


def user_database(environ: Mapping[str, str]) -> Path:
    """Return an installed kvapp's default database: ~/.local/share/kvapp/kvapp.sqlite3."""
    return xdg_home(environ, "XDG_DATA_HOME", ".local/share") / "kvapp" / "kvapp.sqlite3"


def default_config(environ: Mapping[str, str], installed: bool | None = None) -> Path | None:
    """Return the config file to read when none is named, or None for the built-in defaults.

    installed: None finds out (is_checkout); tests pass True or False.
    """
    if "KVAPP_CONFIG" in environ:
        if not environ["KVAPP_CONFIG"].strip():
            # Set but empty: a mistake (an unset variable expanded), not a choice.
            raise ConfigError("KVAPP_CONFIG is empty: name a config file, or unset it")
        return Path(environ["KVAPP_CONFIG"])
    if installed is None:
        installed = not is_checkout()
    if not installed:
        return CHECKOUT_CONFIG
    found = user_config(environ)
    return found if found.is_file() else None


@dataclass(frozen=True)
class Settings:
    database: str
    busy_timeout_ms: int
    database_timeout_seconds: int
    synchronous: str
    startup_check_max_bytes: int
    read_cache_bytes: int
    sweep_interval_seconds: int
    metrics_path: str
    max_key_bytes: int
    max_value_bytes: int
    max_body_bytes: int
    max_txn_ops: int
    host: str
    port: int
    threads: int
    workers: int
    connection_limit: int
    channel_timeout: int
    max_request_header_size: int
    trusted_proxy: str
    trusted_proxy_headers: tuple[str, ...]
    trusted_proxy_count: int
    allowed_hosts: tuple[str, ...]
    auth_token: str = field(repr=False)  # a secret: never in a log or traceback
    watch_history_seconds: int
    watch_history_max: int
    watch_heartbeat_seconds: int
    max_watchers: int | None  # None: auto, see watcher_limit
    max_wait_seconds: int
    log_level: str
    access_log: bool
    source: str = field(default=BUILT_IN, compare=False)  # the config file read

    @property
    def watcher_limit(self) -> int:
        """Return how many watchers a process serves at once: max_watchers, or half of threads.

        Under waitress each holds one of the threads; half leaves the other
        half for every other request.
        """
        return self.threads // 2 if self.max_watchers is None else self.max_watchers

    def waitress_options(self) -> dict[str, Any]:
        """Return the keyword arguments for waitress.serve().

        waitress 3.0 compares its limits so that each setting here means what
        config.ini says (see the waitress source named in each comment).
        """
        options: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "threads": self.threads,
            # server.py readable(): the listening socket and the wake-up pipe
            # count toward waitress's limit, so it admits two clients fewer.
            "connection_limit": self.connection_limit + 2,
            "channel_timeout": self.channel_timeout,
            # server.py maintenance() looks for idle channels only every
            # cleanup_interval (default 30 s); at half the timeout an idle
            # connection lives at most 1.5 x channel_timeout.
            "cleanup_interval": max(1, self.channel_timeout // 2),
            # parser.py received(): 431 when the header block is >= the limit,
            # 413 when Content-Length (or a chunked body so far) is >= it.
            "max_request_header_size": self.max_request_header_size + 1,
            "max_request_body_size": self.max_body_bytes + 1,
            # poll() has no FD_SETSIZE (1024) ceiling on connection_limit; select() has.
            "asyncore_use_poll": True,
            "ident": "kvapp",
            # Forwarded headers (X-Forwarded-For...) are dropped from every request
            # but trusted_proxy's.  waitress 3 does so by default; kvapp relies on
            # it, so it is stated here rather than left to a default.
            "clear_untrusted_proxy_headers": True,
        }
        if self.trusted_proxy:
            # Requests from trusted_proxy get REMOTE_ADDR from X-Forwarded-For
            # (the first of its last trusted_proxy_count entries) and
            # wsgi.url_scheme from X-Forwarded-Proto: the access log and the
            # guard see the client, not the proxy.
            options["trusted_proxy"] = self.trusted_proxy
            options["trusted_proxy_headers"] = set(self.trusted_proxy_headers)
            options["trusted_proxy_count"] = self.trusted_proxy_count
        return options


def describe_config(source: str, environ: Mapping[str, str]) -> str:
    """Return serve's startup line about Settings.source: the file read, or none and why."""
    if source != BUILT_IN:
        return f"config {source}"
    return f"config {BUILT_IN} (no {user_config(environ)}, no KVAPP_CONFIG)"


def _resolved(path: Path, what: str) -> Path:
    """Return path made absolute and resolved (location.resolved); else ConfigError."""
    try:
        return resolved(path)
    except LocationError as exc:
        raise ConfigError(f"bad value for {what}: {exc}") from None


def _file_setting(value: str, base: Path, what: str, environ: Mapping[str, str]) -> str:
    """Return the absolute file a path setting names (location.file_path); else ConfigError."""
    try:
        return str(file_path(value, base, environ))
    except LocationError as exc:
        raise ConfigError(f"bad value for {what}: {exc}") from None


def load_config(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    installed: bool | None = None,
    **overrides: Any,
) -> Settings:
    """Return the Settings from defaults, the config file, the environment and overrides.

    path None: the file default_config() finds, if any.  installed: None finds
    out (is_checkout); tests pass True or False.
    Raises ConfigError for a missing file, an unknown setting or a bad value.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    if installed is None:
        installed = not is_checkout()
    found = default_config(env, installed) if path is None else Path(path)
    config_path = None if found is None else _resolved(found, "the config file")
    raw = {name: default for name, (_, _, default) in _BY_NAME.items()}
    origin = {name: "default" for name in raw}
    if installed:
        # Data belongs under XDG_DATA_HOME, not beside a config file in ~/.config.
        raw["database"] = str(user_database(env))

    # default_section: a [DEFAULT] section is a section like any other (and so
    # unknown), instead of being merged silently into every other section.
    # inline_comment_prefixes: `port = 4411  # my port` is 4411.  A '#' or ';'
    # that follows whitespace starts a comment, so a value cannot hold one
    # there (configparser's documented rule).
    parser = configparser.ConfigParser(
        interpolation=None, default_section="\0none", inline_comment_prefixes=("#", ";")
    )
    if config_path is not None:
        try:
            with open(config_path, encoding="utf-8") as handle:
                parser.read_file(handle)
        except FileNotFoundError:
            raise ConfigError(f"config file {config_path} does not exist") from None
        except (configparser.Error, UnicodeDecodeError, OSError) as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(f"config file {config_path} cannot be read: {first}") from None
    for section in parser.sections():
        for name, value in parser.items(section):
            if name not in _BY_NAME or _BY_NAME[name][0] != section:
                raise ConfigError(f"{config_path}: unknown setting [{section}] {name}")
            raw[name] = value
            origin[name] = f"{config_path} [{section}] {name}"

    for key, value in env.items():
        if not key.startswith("KVAPP_") or key == "KVAPP_CONFIG":
            continue
        name = key[len("KVAPP_") :].lower()
        # Upper case only: KVAPP_port beside KVAPP_PORT would let the order of
        # the environment decide between them.
        if name not in _BY_NAME or key != f"KVAPP_{name.upper()}":
            raise ConfigError(f"unknown setting {key} in the environment")
        raw[name] = value
        origin[name] = f"environment variable {key}"

    # Overrides (command-line options) pass the same converters as the file,
    # written back as the text a config file would hold.
    for name, value in overrides.items():
        if name not in _BY_NAME:
            raise ConfigError(f"unknown setting {name}")
        raw[name] = " ".join(value) if isinstance(value, (tuple, list)) else str(value)
        origin[name] = f"--{name.replace('_', '-')}"

    values: dict[str, Any] = {}
    for name, (_, convert, _) in _BY_NAME.items():
        try:
            values[name] = convert(raw[name])
        except ValueError as exc:
            raise ConfigError(f"bad value for {name} ({origin[name]}): {exc}") from None

    # Streams and long-polls each hold a thread: with as many as threads,
    # watchers could take every thread, /healthz included.
    if values["max_watchers"] is not None and values["max_watchers"] >= values["threads"]:
        raise ConfigError(
            f"bad value for max_watchers ({origin['max_watchers']}): {values['max_watchers']}"
            f" is not below threads ({values['threads']}): watchers would hold every thread;"
            " raise threads or lower max_watchers"
        )
    database = values["database"]
    try:
        check_location(database)
    except LocationError as exc:
        raise ConfigError(f"bad value for database ({origin['database']}): {exc}") from None
    # Relative paths are relative to the config file's folder, or with no
    # file to the working directory.
    base = Path.cwd() if config_path is None else config_path.parent
    for name in ("database", "metrics_path"):
        if values[name] and not (name == "database" and is_postgres_url(database)):
            values[name] = _file_setting(values[name], base, f"{name} ({origin[name]})", env)
    source = BUILT_IN if config_path is None else str(config_path)
    return Settings(source=source, **values)
