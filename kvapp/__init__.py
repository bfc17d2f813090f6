"""kvapp: a durable key-value store over HTTP, as a framework-free WSGI app."""

from __future__ import annotations

from kvapp.config import Settings


def create_app(settings: Settings):  # -> kvapp.app.App
    """Return the WSGI app for settings; raise DatabaseUnusable if the database is unfit."""
    from kvapp.app import App
    from kvapp.repository import Repository

    repository = Repository(
        settings.database,
        busy_timeout_ms=settings.busy_timeout_ms,
        synchronous=settings.synchronous,
        startup_check_max_bytes=settings.startup_check_max_bytes,
    )
    return App(settings, repository)


__all__ = ["create_app"]
