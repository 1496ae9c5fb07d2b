"""``GET /healthz`` (is this edge useful right now?) and ``GET /metrics``."""

from __future__ import annotations

import msgspec
from aiohttp import web

from services.edge.state import EDGE, METRICS

_encode = msgspec.json.Encoder().encode


def nats_state(nc) -> str:
    """The connection's state in one word."""
    if nc.is_connected:
        return "connected"
    if nc.is_reconnecting:
        return "reconnecting"
    if nc.is_draining:
        return "draining"
    return "closed" if nc.is_closed else "disconnected"


async def healthz(request: web.Request) -> web.Response:
    """200 when connected to NATS and accepting requests, else 503; lists live engines and their models."""
    edge = request.app[EDGE]
    state = nats_state(edge.nc)
    ok = state == "connected" and edge.accepting
    body = {
        "status": "ok" if ok else ("draining" if not edge.accepting else "unavailable"),
        "nats": state,
        "engines": len(edge.table.live()),
        "models": sorted(edge.table.models()),
        "in_flight": len(edge.router),
        "edge_id": edge.edge_id,
    }
    return web.Response(status=200 if ok else 503, body=_encode(body), content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition of the edge's metrics."""
    body, content_type = request.app[METRICS].render()
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = content_type
    return resp
