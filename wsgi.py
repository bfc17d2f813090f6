"""The WSGI entry point: `waitress-serve --port=4000 wsgi:app` from this folder."""

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
