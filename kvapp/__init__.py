"""kvapp: a durable key-value store over HTTP, as a framework-free WSGI app."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from kvapp.config import Settings, is_database_url


def open_repository(settings: Settings, clock: Callable[[], float] = time.time):
    """Return the repository settings.database names: PostgreSQL for a URL, else an SQLite file.

    Raises DatabaseUnusable if the database is unfit.
    """
    if is_database_url(settings.database):
        return postgres_repository_class()(
            settings.database,
            busy_timeout_ms=settings.busy_timeout_ms,
            synchronous=settings.synchronous,
            # One connection per waitress thread, plus the sweeper and one spare.
            pool_size=settings.threads + 2,
            clock=clock,
        )
    from kvapp.repository import Repository

    return Repository(
        settings.database,
        busy_timeout_ms=settings.busy_timeout_ms,
        synchronous=settings.synchronous,
        startup_check_max_bytes=settings.startup_check_max_bytes,
        read_cache_bytes=settings.read_cache_bytes,
        clock=clock,
    )


def postgres_repository_class() -> type:
    """Return kvapp.postgres.PostgresRepository; DatabaseUnusable if psycopg cannot be imported."""
    try:
        from kvapp.postgres import PostgresRepository
    except ImportError as exc:
        from kvapp.repository import DatabaseUnusable

        raise DatabaseUnusable(
            f"a PostgreSQL database needs psycopg, which {sys.executable} cannot import"
            f" ({exc}); run kvapp with the Python of the venv that"
            " `pip install -r requirements.txt` filled (.venv/bin/python)"
        ) from None
    return PostgresRepository


def create_app(settings: Settings):  # -> kvapp.app.App
    """Return the WSGI app for settings; raise DatabaseUnusable if the database is unfit."""
    from kvapp.app import App

    return App(settings, open_repository(settings))


__all__ = ["create_app", "open_repository", "postgres_repository_class"]
