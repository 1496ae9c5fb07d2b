"""Where an engine started without ``--model-path`` gets its first model: the registry and the object store.

An engine on its own host (another machine, a pod) shares no disk with whoever provisioned the
bus. Given only ``--model-id``, it looks the model up in ``llm_models`` and fetches its weights
into its own ``--state-dir`` (``model_registry.fetch_source``: the default model's published
GGUF, a fine-tuned model's tar, or a path/hub id that must exist on this host), then starts as if
the path had been given.
"""

from __future__ import annotations

import logging
from pathlib import Path

import msgspec

from schemas import names
from schemas.errors import BusError
from services.common import bus, bus_permissions, model_registry
from services.engine.config import EngineConfig

log = logging.getLogger(__name__)

# Engines that load nothing from a local path (the simulated one; MindIE serves from its own server).
PATHLESS_ENGINES = frozenset({"simulated", "mindie"})


class ModelUnavailable(RuntimeError):
    """The registry does not know the model, or its weights cannot be fetched to this host."""


async def with_model_path(cfg: EngineConfig, state_dir: Path) -> EngineConfig:
    """``cfg`` with ``model_path`` (and the registry's aliases and context length) filled in when it has none."""
    if cfg.model_path or cfg.engine in PATHLESS_ENGINES:
        return cfg
    worker = names.token(cfg.worker_id)
    nc = await bus.connect(cfg, f"cy-engine-{worker}-fetch", inbox=names.identity_inbox(bus_permissions.ENGINE, worker))
    try:
        js = nc.jetstream()
        try:
            entry = await model_registry.lookup(js, cfg.model_id)
            if entry is None:
                raise ModelUnavailable(f"--model-id {cfg.model_id!r} is not in the model registry and no --model-path "
                                       "was given (./cy infra apply registers the default model)")
            log.info("model %s: no --model-path, fetching %s into %s", entry.id, entry.source, state_dir)
            path = await model_registry.fetch_source(entry, cfg.engine, state_dir, js)
        except BusError as exc:
            raise ModelUnavailable(exc.message) from None
    finally:
        await nc.close()
    log.info("model %s: loading from %s", entry.id, path)
    return msgspec.structs.replace(cfg, model_path=str(path), aliases=cfg.aliases or list(entry.aliases),
                                   context_length=cfg.context_length or entry.context_length)
