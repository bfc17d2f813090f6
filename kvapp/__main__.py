"""kvapp: serve the HTTP API; back up, export, import, copy, check and inspect the data."""

from __future__ import annotations

import argparse
import os
import sys

from kvapp import create_app, workers
from kvapp.config import SETTINGS, ConfigError, describe_config, load_config
from kvapp.store.base import DatabaseUnusable
from kvapp.store.location import redact
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
    settings = load_config(args.config, **overrides)
    setup_logging(settings)
    return workers.serve(
        lambda: create_app(settings),
        settings.waitress_options(),
        settings.workers,
        banner=f"serving {redact(settings.database)}",
        notes=[describe_config(settings.source, os.environ)],
    )


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
