"""The store: everything below the HTTP edge.  base.py is the contract every backend keeps."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvapp.store.base import DatabaseUnusable, Store
from kvapp.store.location import is_postgres_url

if TYPE_CHECKING:
    from kvapp.config import Settings


def open_store(
    settings: Settings,
    location: str | None = None,
    *,
    synchronous: str | None = None,
    startup_check_max_bytes: int | None = None,
    clock: Callable[[], float] = time.time,
) -> Store:
    """Return the store at location (default: settings.database): PostgreSQL for a URL, else SQLite.

    Raises DatabaseUnusable if the database is unfit, or if it is PostgreSQL
    and psycopg cannot be imported.
    """
    location = settings.database if location is None else location
    synchronous = synchronous or settings.synchronous
    if is_postgres_url(location):
        try:
            from kvapp.store.postgres import PostgresStore
        except ImportError as exc:
            raise DatabaseUnusable(
                f"a PostgreSQL database needs psycopg, which {sys.executable} cannot import"
                f" ({exc}); install kvapp with its postgresql extra, or run it with the"
                " Python of the venv that `pip install -r requirements.txt` filled"
                " (.venv/bin/python)"
            ) from None
        return PostgresStore(
            location,
            busy_timeout_ms=settings.busy_timeout_ms,
            synchronous=synchronous,
            # One connection per waitress thread, plus the sweeper and one spare.
            pool_size=settings.threads + 2,
            clock=clock,
            timeout_seconds=settings.database_timeout_seconds,
        )
    from kvapp.store.sqlite import SQLiteStore

    return SQLiteStore(
        location,
        busy_timeout_ms=settings.busy_timeout_ms,
        synchronous=synchronous,
        startup_check_max_bytes=(
            settings.startup_check_max_bytes
            if startup_check_max_bytes is None
            else startup_check_max_bytes
        ),
        read_cache_bytes=settings.read_cache_bytes,
        clock=clock,
    )


__all__ = ["open_store"]
