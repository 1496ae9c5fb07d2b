"""``GET /v1/models`` and ``GET /v1/models/{id}``: the models live engines actually serve.

Fine-tuned models are listed as ``<base>:<adapter>``: every adapter an engine reports loaded,
and every adapter in the model registry (``llm_models``, kind ``adapter``) whose base model is
served now (an engine loads it on the first request).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import msgspec
import nats.js.errors
from aiohttp import web
from nats.errors import Error as NatsError

from schemas import names
from schemas.errors import BusError, ErrorCode
from schemas.registry import ADAPTER, ModelEntry
from services.common.buckets import kv_keys
from services.common.model_ref import adapter_model_id, split_model
from services.common.worker_table import WorkerTable
from services.edge.state import EDGE

log = logging.getLogger(__name__)

_encode = msgspec.json.Encoder().encode
_entry_decoder = msgspec.json.Decoder(ModelEntry)

FINE_TUNE_OWNER = "cy-llm-fine-tune"


def _fine_tuned(base: str, adapter: str, created: int) -> dict:
    # ``parent``/``root`` as vLLM lists LoRA modules, so clients can tell what a fine-tune is built on.
    return {"id": adapter_model_id(base, adapter), "object": "model", "created": created,
            "owned_by": FINE_TUNE_OWNER, "parent": base, "root": base}


def model_objects(table: WorkerTable, registry: Iterable[ModelEntry] = ()) -> dict[str, dict]:
    """OpenAI model objects by id; ``created`` is when the earliest engine serving the model started."""
    out: dict[str, dict] = {}
    for state in table.live():
        hb = state.heartbeat
        if hb.draining:
            continue
        created = int(hb.started)
        for m in hb.models:
            entry = out.get(m.id)
            if entry is None:
                out[m.id] = {"id": m.id, "object": "model", "created": created, "owned_by": m.owned_by}
            elif created and (not entry["created"] or created < entry["created"]):
                entry["created"] = created
        per_model = [(m.id, m.adapters) for m in hb.models if m.adapters]
        if not per_model and len(hb.models) == 1:  # an older engine reports adapters per engine, for its one model
            per_model = [(hb.models[0].id, hb.adapters)]
        for base, adapters in per_model:
            for adapter in adapters:
                obj = _fine_tuned(base, adapter, created)
                out.setdefault(obj["id"], obj)
    for entry in registry:
        served = table.resolve(entry.base) if entry.kind == ADAPTER and entry.base else None
        if served is not None:
            obj = _fine_tuned(served.id, entry.id, entry.created_at)
            out.setdefault(obj["id"], obj)
    return out


async def registry_adapters(js) -> list[ModelEntry]:
    """Adapter entries of the model registry; empty (logged) when it cannot be read."""
    try:
        kv = await js.key_value(names.MODELS_BUCKET)
        keys = await kv_keys(kv)
    except nats.js.errors.BucketNotFoundError:
        return []
    except (NatsError, asyncio.TimeoutError) as exc:
        log.warning("model registry not read: %s", exc)
        return []
    out = []
    for key in keys:
        try:
            raw = await kv.get(key)
            entry = _entry_decoder.decode(raw.value or b"")
        except (nats.js.errors.KeyNotFoundError, msgspec.DecodeError):
            continue  # deleted meanwhile, or not ours to read
        except (NatsError, asyncio.TimeoutError) as exc:
            log.warning("model registry entry %s not read: %s", key, exc)
            continue
        if entry.kind == ADAPTER:
            out.append(entry)
    return out


async def list_models(request: web.Request) -> web.Response:
    """The OpenAI model list."""
    edge = request.app[EDGE]
    models = model_objects(edge.table, await registry_adapters(edge.nc.jetstream()))
    data = [models[k] for k in sorted(models)]
    return web.Response(body=_encode({"object": "list", "data": data}), content_type="application/json")


async def get_model(request: web.Request) -> web.Response:
    """One model by id or alias (answered under its canonical id); 404 ``model_not_found`` if nobody serves it."""
    name = request.match_info["model"]
    edge = request.app[EDGE]
    table = edge.table
    model = None
    try:
        base, adapter = split_model(name, None, lambda n: table.resolve(n) is not None)
    except BusError:
        base, adapter = name, None
    served = table.resolve(base)
    if served is not None:
        registry = await registry_adapters(edge.nc.jetstream()) if adapter else []
        model = model_objects(table, registry).get(adapter_model_id(served.id, adapter))
    if model is None:
        raise BusError(ErrorCode.MODEL_NOT_FOUND, f"The model '{name}' does not exist or no engine serves it now",
                       param="model")
    return web.Response(body=_encode(model), content_type="application/json")
