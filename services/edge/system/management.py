"""Management endpoints of the cross-platform seed document: system and cluster views, strategy switch.

``/v1/system/*`` describe this edge; ``/v1/cluster/*`` the whole platform as the bus shows it
(engines from heartbeats, queue depth from the lane consumers, the routing strategy from KV).
All need the ``admin`` scope when auth is on (see ``auth_policy``).
"""

from __future__ import annotations

import time

import msgspec
import nats.errors
import nats.js.errors
from aiohttp import web

from schemas import names
from schemas.errors import BusError, ErrorCode
from schemas.routing import Strategy
from services.edge.system import health
from services.edge.native import api as native_api
from services.edge.state import EDGE, METRICS

_encode = msgspec.json.Encoder().encode
_STARTED = time.time()
_BUS_ERRORS = (nats.errors.Error, TimeoutError)


def _json(body: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=_encode(body), content_type="application/json")


async def system_health(request: web.Request) -> web.Response:
    """``GET /v1/system/health``: the detailed health of ``/api/v1/health?detail=true``."""
    return await native_api.health_check(request.clone(rel_url=request.rel_url.with_query(detail="true")))


async def system_status(request: web.Request) -> web.Response:
    """``GET /v1/system/status``: this edge's identity, uptime and load."""
    edge = request.app[EDGE]
    return _json({"edgeId": edge.edge_id, "uptimeSeconds": round(time.time() - _STARTED, 1),
                  "accepting": edge.accepting, "nats": health.nats_state(edge.nc), "inFlight": len(edge.router),
                  "engines": len(edge.table.live()), "models": sorted(edge.table.models())})


async def system_metrics(request: web.Request) -> web.Response:
    """``GET /v1/system/metrics``: this edge's Prometheus metrics as JSON (``/metrics`` stays Prometheus)."""
    out: dict[str, list[dict]] = {}
    for family in request.app[METRICS].registry.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket") or sample.name.endswith("_created"):
                continue
            out.setdefault(sample.name, []).append({"labels": sample.labels, "value": sample.value})
    return _json(out)


async def _queue_depth(js) -> dict[str, int | None]:
    depth: dict[str, int | None] = {}
    for lane in names.LANES_BY_PRIORITY:
        try:
            info = await js.consumer_info(names.INFER_STREAM, names.scheduler_durable(lane))
            depth[lane.value] = info.num_pending + info.num_ack_pending
        except _BUS_ERRORS:
            depth[lane.value] = None
    return depth


async def _active_strategy(js) -> str | None:
    try:
        kv = await js.key_value(names.SCHEDULER_CONFIG_BUCKET)
        entry = await kv.get(names.STRATEGY_KEY)
    except nats.js.errors.KeyNotFoundError:
        return None  # each scheduler uses its configured strategy
    except _BUS_ERRORS:
        return None
    return (entry.value or b"").decode(errors="replace").strip() or None


async def cluster_status(request: web.Request) -> web.Response:
    """``GET /v1/cluster/status``: engines and their load, models, adapters, strategy, queue depth per lane."""
    edge = request.app[EDGE]
    js = edge.nc.jetstream()
    engines = [{"worker": s.worker, "engine": s.heartbeat.engine, "device": s.heartbeat.device,
                "models": [m.id for m in s.heartbeat.models], "adapters": list(s.heartbeat.adapters),
                "slots": s.heartbeat.slots, "inFlight": s.in_flight, "draining": s.heartbeat.draining,
                "memoryBytes": s.heartbeat.memory_bytes, "health": s.heartbeat.health,
                "healthReason": s.heartbeat.health_reason} for s in edge.table.live()]
    strategy = await _active_strategy(js)
    return _json({"engines": engines, "models": sorted(edge.table.models()),
                  "strategy": strategy or "configured default (no cluster-wide override)",
                  "queueDepth": await _queue_depth(js)})


class _StrategyBody(msgspec.Struct):
    strategy: str


async def set_strategy(request: web.Request) -> web.Response:
    """``POST /v1/cluster/strategy`` ``{"strategy": NAME}``: every scheduler replica switches (KV watch)."""
    try:
        body = msgspec.json.decode(await request.read(), type=_StrategyBody)
    except msgspec.DecodeError as exc:
        raise BusError(ErrorCode.INVALID_REQUEST, f"invalid body: {exc}", param="strategy") from None
    try:
        strategy = Strategy(body.strategy.strip().lower())
    except ValueError:
        raise BusError(ErrorCode.INVALID_REQUEST, f"unknown strategy '{body.strategy}'; choose one of: "
                       + ", ".join(s.value for s in Strategy), param="strategy") from None
    try:
        kv = await request.app[EDGE].nc.jetstream().key_value(names.SCHEDULER_CONFIG_BUCKET)
        await kv.put(names.STRATEGY_KEY, strategy.value.encode())
    except _BUS_ERRORS as exc:
        raise BusError(ErrorCode.NO_WORKER, f"could not store the strategy: {exc}") from None
    return _json({"strategy": strategy.value})
