"""The WSGI entry point: `waitress-serve --listen 127.0.0.1:4000 wsgi:app` from this folder."""

import sys
from pathlib import Path

from kvapp import create_app
from kvapp.config import ConfigError, load_config
from kvapp.store.base import DatabaseUnusable
from kvapp.web.logs import setup_logging

try:
    settings = load_config()
    setup_logging(settings)
    app = create_app(settings)
except (ConfigError, DatabaseUnusable) as exc:
    # One line on stderr and exit status 1; no traceback for a setup problem.
    raise SystemExit(f"kvapp: {exc}") from None

if Path(sys.argv[0]).name == "waitress-serve" or sys.argv[0].endswith("waitress/__main__.py"):
    # waitress-serve builds its server after importing this module: give it
    # kvapp's channel and main loop, without which many clients collapse it
    # (kvapp/server.py, kvapp/mainloop.py), and the app whose streams end on stop.
    from kvapp.server import adopt_waitress

    adopt_waitress(app)
