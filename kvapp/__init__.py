"""kvapp: a durable key-value store over HTTP, as a framework-free WSGI app."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvapp.config import Settings
    from kvapp.web.app import App


def create_app(settings: Settings) -> App:
    """Return the WSGI app for settings; raise DatabaseUnusable if the database is unfit."""
    from kvapp.store import open_store
    from kvapp.web.app import App

    return App(settings, open_store(settings))


__all__ = ["create_app"]
