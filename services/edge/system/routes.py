"""The edge's operator surface: ``/healthz``, ``/metrics``, ``/openapi.json``, ``/v1/system/*`` and
``/v1/cluster/*``; registered on the app by ``add_routes``."""

from __future__ import annotations

from aiohttp import web

from services.edge.system import health, management, openapi


def add_routes(app: web.Application) -> None:
    """Register the health, status, metrics, cluster and OpenAPI routes."""
    r = app.router
    r.add_get("/healthz", health.healthz)
    r.add_get("/v1/system/health", management.system_health)
    r.add_get("/v1/system/status", management.system_status)
    r.add_get("/v1/system/metrics", management.system_metrics)
    r.add_get("/v1/cluster/status", management.cluster_status)
    r.add_post("/v1/cluster/strategy", management.set_strategy)
    r.add_get("/metrics", health.metrics)
    r.add_get("/openapi.json", openapi.serve_document)
