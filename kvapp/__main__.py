"""kvapp: serve the HTTP API; back up, export, import, copy, check and inspect the data."""

from __future__ import annotations

import argparse
import os
import sys

from kvapp import create_app, workers
from kvapp.config import SETTINGS, ConfigError, describe_config, load_config
from kvapp.store.base import DatabaseUnusable
from kvapp.store.location import LocationError, check_location, is_postgres_url, redact
from kvapp.tools.commands import OneLineParser, add_commands
from kvapp.web.logs import setup_logging


def serve(args: argparse.Namespace) -> int:
    overrides = {
        name: value
        for name, value in (
            ("host", args.host),
            ("port", args.port),
            ("threads", args.threads),
            ("workers", args.workers),
        )
        if value is not None
    }
    if args.database is not None:
        overrides["database"] = _command_line_database(args.database)
    settings = load_config(args.config, **overrides)
    setup_logging(settings)
    return workers.serve(
        lambda: create_app(settings),
        settings.waitress_options(),
        settings.workers,
        banner=f"serving {redact(settings.database)}",
        notes=[describe_config(settings.source, os.environ)],
    )


def _command_line_database(location: str) -> str:
    """Return --database as load_config takes it: a file path made absolute, or the URL.

    A path on the command line is relative to the working directory, as for
    the data tools, not to the config file's folder.  It is checked before it
    is made absolute: /cwd/pgsql:/host/db would pass for a file path.  A path
    that starts with ~ (the shell leaves --database=~/kv.sqlite3 alone) is
    load_config's to expand, and a trailing / is kept for it to refuse.
    """
    try:
        check_location(location)
    except LocationError as exc:
        raise ConfigError(f"bad value for database (--database): {exc}") from None
    if is_postgres_url(location) or location.startswith("~"):
        return location
    return os.path.join(os.getcwd(), location)


def main(argv: list[str] | None = None) -> int:
    # The `kvapp` command that pip installs, or python -m kvapp.
    prog = "kvapp" if os.path.basename(sys.argv[0]) == "kvapp" else "python -m kvapp"
    parser = OneLineParser(prog=prog, description=__doc__)
    parser.add_argument(
        "--config",
        help="config file (default: $KVAPP_CONFIG, else the checkout's config.ini;"
        " installed: ~/.config/kvapp/config.ini if it exists, else built-in defaults)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="serve the HTTP API with waitress")
    shipped = {name: default for _, name, _, default, _ in SETTINGS}
    for flag, kind, what in (
        ("host", str, "listen address"),
        ("port", int, "listen port"),
        ("threads", int, "waitress threads"),
        ("workers", int, "worker processes"),
    ):
        run.add_argument(
            f"--{flag}", type=kind, help=f"{what} (default from config.ini: {shipped[flag]})"
        )
    run.add_argument(
        "--database",
        metavar="URL",
        help="SQLite file (relative to the working directory) or postgresql:// URL"
        " (default from config.ini: its database)",
    )
    run.set_defaults(func=serve)
    add_commands(commands)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DatabaseUnusable, OSError) as exc:  # OSError: e.g. the port is taken
        print(f"kvapp: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
