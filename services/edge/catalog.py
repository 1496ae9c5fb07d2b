"""``GET /v1/models`` and ``GET /v1/models/{id}``: the models live engines actually serve."""

from __future__ import annotations

import msgspec
from aiohttp import web

from schemas.errors import BusError, ErrorCode
from services.common.worker_table import WorkerTable
from services.edge.state import EDGE

_encode = msgspec.json.Encoder().encode


def model_objects(table: WorkerTable) -> dict[str, dict]:
    """OpenAI model objects by id; ``created`` is when the earliest engine serving the model started."""
    out: dict[str, dict] = {}
    for state in table.live():
        hb = state.heartbeat
        if hb.draining:
            continue
        for m in hb.models:
            created = int(hb.started)
            entry = out.get(m.id)
            if entry is None:
                out[m.id] = {"id": m.id, "object": "model", "created": created, "owned_by": m.owned_by}
            elif created and (not entry["created"] or created < entry["created"]):
                entry["created"] = created
    return out


async def list_models(request: web.Request) -> web.Response:
    """The OpenAI model list."""
    models = model_objects(request.app[EDGE].table)
    data = [models[k] for k in sorted(models)]
    return web.Response(body=_encode({"object": "list", "data": data}), content_type="application/json")


async def get_model(request: web.Request) -> web.Response:
    """One model by id or alias (answered under its canonical id); 404 ``model_not_found`` if nobody serves it."""
    name = request.match_info["model"]
    table = request.app[EDGE].table
    served = table.resolve(name)
    model = model_objects(table).get(served.id) if served is not None else None
    if model is None:
        raise BusError(ErrorCode.MODEL_NOT_FOUND, f"The model '{name}' does not exist or no engine serves it now",
                       param="model")
    return web.Response(body=_encode(model), content_type="application/json")
