"""``python -m services.engine``: run one engine worker."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry, start_http_server

from services.common.lifecycle import install_stop_signals, run, setup_logging
from services.common.model_store import default_state_dir
from services.engine.adapters import adapter_class
from services.engine.config import EngineConfig, parse_args
from services.engine.metrics import EngineMetrics
from services.engine.service import EngineService

log = logging.getLogger("services.engine")


def build_adapter(cfg: EngineConfig):
    """Instantiate the configured adapter (imported lazily)."""
    cls = adapter_class(cfg.engine)
    if cfg.engine == "simulated":
        return cls(model_id=cfg.model_id, aliases=cfg.aliases, slots=cfg.slots, token_rate=cfg.sim_token_rate,
                   ttft=cfg.sim_ttft, context_length=cfg.context_length or 8192)
    return cls(model_path=cfg.model_path, model_id=cfg.model_id, aliases=cfg.aliases, slots=cfg.slots,
               device=cfg.device, dtype=cfg.dtype, context_length=cfg.context_length, adapter_dirs=cfg.adapter_dirs,
               adapter_cache_dir=cfg.adapter_cache_dir or default_state_dir() / "adapters",
               max_adapters=cfg.max_adapters)


async def main(cfg: EngineConfig) -> None:
    """Build the engine and serve until SIGTERM/SIGINT."""
    registry = CollectorRegistry()
    if cfg.metrics_port:
        start_http_server(cfg.metrics_port, addr="127.0.0.1", registry=registry)
    stop = asyncio.Event()
    install_stop_signals(stop)
    service = EngineService(cfg, build_adapter(cfg), EngineMetrics(registry))
    await service.run(stop)


def cli() -> None:
    """Entry point."""
    cfg = parse_args()
    setup_logging("engine")
    run(lambda: main(cfg))


if __name__ == "__main__":
    cli()
