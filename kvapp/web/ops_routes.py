"""Routes for operators and tools: /healthz, /metrics and /openapi.json."""

from __future__ import annotations

from pathlib import Path

from kvapp.store.base import StorageError, Store
from kvapp.web.metrics import CONTENT_TYPE, Metrics
from kvapp.web.request import Request
from kvapp.web.responses import JSON, Response, ServiceUnavailable, text

OPENAPI = Path(__file__).with_name("openapi.json")


class Operations:
    """The operator route functions, bound to one repository and the process's Metrics."""

    def __init__(self, repository: Store, metrics: Metrics) -> None:
        self.repository = repository
        self.metrics = metrics
        self.openapi_document = OPENAPI.read_bytes()

    def healthz(self, request: Request) -> Response:
        """GET or HEAD /healthz: 200 when the database answers reads and takes writes, else 503."""
        try:
            self.repository.check_health()
        except StorageError as exc:
            raise ServiceUnavailable(f"unhealthy: {exc}") from None
        return text("ok")

    def metrics_page(self, request: Request) -> Response:
        """GET or HEAD /metrics: the Prometheus text exposition of every process's counts."""
        keys, database_bytes = self.repository.stats()
        body = self.metrics.render(keys, database_bytes)
        return Response(200, body.encode("utf-8"), CONTENT_TYPE)

    def openapi(self, request: Request) -> Response:
        """GET or HEAD /openapi.json: the OpenAPI 3.1 description of the whole API."""
        return Response(200, self.openapi_document, JSON, [("Cache-Control", "no-cache")])
