"""``POST /v1/models/load`` and ``DELETE /v1/models/{model}``: load and unload models on engines.

Both go to the engines' control subjects (``llm.v1.engine.<worker>.control``); the engine's
typed error becomes the OpenAI error body. A load goes to the named ``worker``, else to the
engine the scheduler's cold start would pick (``load_placement``); an unload goes to every
live engine serving the model, or only to ``?worker=``. Both need the ``admin`` scope.
"""

from __future__ import annotations

import asyncio

import msgspec
import nats.errors
from aiohttp import web

from schemas import names
from schemas.control import ControlReply, LoadModel, UnloadModel, decode_reply
from schemas.errors import BusError, ErrorCode
from schemas.events import encode
from services.common import model_registry
from services.common.worker_table import WorkerTable
from services.edge.state import EDGE
from services.common.load_placement import loader_candidates

_encode = msgspec.json.Encoder().encode
LOAD_TIMEOUT = 300.0  # loading a large model from disk can take minutes
UNLOAD_TIMEOUT = 120.0  # an unload waits for the model's requests in flight


class LoadBody(msgspec.Struct, forbid_unknown_fields=True):
    """The body of ``POST /v1/models/load``."""

    model: str
    worker: str | None = None


def _json(body: object) -> web.Response:
    return web.Response(body=_encode(body), content_type="application/json")


def _live_worker(table: WorkerTable, worker: str) -> str:
    if table.get(worker) is None or not table.is_alive(worker):
        raise BusError(ErrorCode.NOT_FOUND, f"engine {worker!r} is not a live engine (see GET /v1/cluster/status)",
                       param="worker")
    return worker


async def control(nc, table: WorkerTable, worker: str, command, timeout: float) -> ControlReply:
    """Send ``command`` to ``worker``; a refusal is raised as its typed error."""
    try:
        msg = await nc.request(names.engine_control(worker), encode(command), timeout=timeout)
        reply = decode_reply(msg.data)
    except nats.errors.NoRespondersError:
        raise BusError(ErrorCode.UNAVAILABLE, f"engine {worker!r} does not take control commands") from None
    except nats.errors.TimeoutError:
        raise BusError(ErrorCode.TIMEOUT, f"engine {worker!r} did not answer within {timeout:.0f}s") from None
    except msgspec.DecodeError as exc:
        raise BusError(ErrorCode.ENGINE_FAILED, f"engine {worker!r} sent a malformed reply: {exc}") from None
    if reply.heartbeat is not None:
        table.observe(reply.heartbeat)  # GET /v1/models shows the change at once
    if not reply.ok:
        raise BusError(reply.code or ErrorCode.ENGINE_FAILED, reply.message or f"engine {worker!r} refused",
                       param=reply.param or ("model" if reply.code == ErrorCode.MODEL_NOT_FOUND else None))
    return reply


async def load_model(request: web.Request) -> web.Response:
    """``POST /v1/models/load`` ``{"model": ID, "worker": optional}``: load a registered model on an engine."""
    edge = request.app[EDGE]
    try:
        body = msgspec.json.decode(await request.read(), type=LoadBody)
    except msgspec.DecodeError as exc:
        raise BusError(ErrorCode.INVALID_REQUEST, f"invalid body: {exc}", param="model") from None
    entry = await model_registry.lookup(edge.nc.jetstream(), body.model)
    if entry is None:
        raise BusError(ErrorCode.MODEL_NOT_FOUND, f"The model '{body.model}' is not in the model registry "
                                                  "(./cy model register)", param="model")
    if body.worker is not None:
        worker = _live_worker(edge.table, body.worker)
    else:
        candidates = loader_candidates(entry, edge.table.live())
        if not candidates:
            raise BusError(ErrorCode.UNAVAILABLE, f"no live engine can load '{entry.id}' now (none of a fitting "
                                                  "kind with room for another model)")
        worker = candidates[0].worker
    reply = await control(edge.nc, edge.table, worker, LoadModel(model=entry.id), LOAD_TIMEOUT)
    return _json({"object": "model.load", "model": reply.model, "worker": reply.worker, "evicted": reply.evicted,
                  "load_seconds": reply.load_seconds, "models": [m.id for m in reply.models]})


async def unload_model(request: web.Request) -> web.Response:
    """``DELETE /v1/models/{model}[?worker=W]``: unload a model from every engine serving it (or from ``W``)."""
    edge = request.app[EDGE]
    name = request.match_info["model"]
    worker = request.query.get("worker")
    if worker is not None:
        state = edge.table.get(_live_worker(edge.table, worker))
        targets = [worker] if state is not None and state.serves(name) else []
    else:
        targets = sorted(s.worker for s in edge.table.live() if s.serves(name))
    if not targets:
        where = f"engine {worker!r}" if worker is not None else "any live engine"
        raise BusError(ErrorCode.MODEL_NOT_FOUND, f"The model '{name}' is not loaded on {where}", param="model")
    results = await asyncio.gather(*(control(edge.nc, edge.table, w, UnloadModel(model=name), UNLOAD_TIMEOUT)
                                     for w in targets), return_exceptions=True)
    unloaded = [r for r in results if isinstance(r, ControlReply)]
    failures = [r for r in results if isinstance(r, BusError)]
    if other := [r for r in results if not isinstance(r, (ControlReply, BusError))]:
        raise other[0]
    if not unloaded:
        raise failures[0]
    return _json({"id": unloaded[0].model or name, "object": "model", "deleted": True,
                  "workers": [r.worker for r in unloaded],
                  "errors": [{"code": e.code, "message": e.message} for e in failures]})
