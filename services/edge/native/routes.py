"""The edge's native inference surface: ``/api/v1/inference`` (JSON, SSE, WebSocket), ``/api/v1/models``
and ``/api/v1/health``; registered on the app by ``add_routes``."""

from __future__ import annotations

from aiohttp import web

from services.edge.native import api, websocket


def add_routes(app: web.Application) -> None:
    """Register the native inference routes."""
    r = app.router
    r.add_post("/api/v1/inference", api.inference)
    r.add_post("/api/v1/inference/stream", api.inference_stream)
    r.add_get("/api/v1/inference/ws", websocket.inference_ws)
    r.add_get("/api/v1/models", api.list_models)
    r.add_get("/api/v1/health", api.health_check)
