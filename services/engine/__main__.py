"""``python -m services.engine``: run one engine worker."""

from __future__ import annotations

import asyncio
import logging
import signal

from pathlib import Path

import msgspec
from prometheus_client import CollectorRegistry

from services.common import gc_heap, metrics_http
from services.common.lifecycle import install_stop_signals, run, setup_logging
from services.common.model_store import default_state_dir
from services.engine.backends import backend_class
from services.engine.config import EngineConfig, parse_args
from services.engine.engine_choice import NoEngineFits, choose_engine, probe_platform
from services.engine.metrics import EngineMetrics
from services.engine.model_source import ModelUnavailable, with_model_path
from services.engine.service import EngineService

log = logging.getLogger("services.engine")


def build_backend(cfg: EngineConfig):
    """Instantiate the configured backend (imported lazily)."""
    cls = backend_class(cfg.engine)
    if cfg.engine == "simulated":
        return cls(model_id=cfg.model_id, aliases=cfg.aliases, slots=cfg.slots, token_rate=cfg.sim_token_rate,
                   ttft=cfg.sim_ttft, context_length=cfg.context_length or 8192)
    if hasattr(cls, "from_config"):  # backends over external engines take what they need from the config
        return cls.from_config(cfg)
    extra = {"enable_lora": False} if cfg.no_lora and cfg.engine == "vllm" else {}
    if cfg.engine in ("transformers", "llamacpp"):
        extra["prefix_cache_bytes"] = cfg.prefix_cache_bytes
        extra["join_window"] = cfg.join_window_ms / 1000
    if cfg.engine == "llamacpp":
        extra["pin_threads"] = cfg.pin_threads
    return cls(model_path=cfg.model_path, model_id=cfg.model_id, aliases=cfg.aliases, slots=cfg.slots,
               device=cfg.device, dtype=cfg.dtype, context_length=cfg.context_length, threads=cfg.threads,
               adapter_dirs=cfg.adapter_dirs,
               adapter_cache_dir=cfg.adapter_cache_dir or Path(cfg.state_dir or default_state_dir()) / "adapters",
               max_adapters=cfg.max_adapters, **extra)


def resolve_auto(cfg: EngineConfig) -> EngineConfig:
    """``--engine auto``: the engine for this machine and model, with the reason logged and heartbeated."""
    if cfg.engine != "auto":
        return cfg
    try:
        engine, reason = choose_engine(probe_platform(cfg.model_path))
    except NoEngineFits as exc:
        raise SystemExit(f"--engine auto: {exc}") from None
    log.info("--engine auto chose %s: %s", engine, reason)
    return msgspec.structs.replace(cfg, engine=engine, engine_reason=reason)


def _health(service: EngineService) -> tuple[bool, dict]:
    """Ready once every subscription is on the server, while connected, not draining and not failed."""
    if not service.ready.is_set():
        return False, {"status": "starting", "worker": service.worker}
    state = service.health_state
    ok, body = metrics_http.nats_health(service.nc, worker=service.worker, engine=state.health.value)
    if state.failed or service.draining:
        ok, body["status"] = False, "draining" if service.draining else "failed"
    return ok, body | ({"reason": state.reason} if state.reason else {})


def _metrics_server(cfg: EngineConfig, registry: CollectorRegistry, health: metrics_http.HealthState):
    """The metrics server on ``--metrics-port``: taken over from its holder with ``--metrics-port-takeover``."""
    if not cfg.metrics_port:
        return None
    if cfg.metrics_port_takeover:
        return metrics_http.PortTakeover(cfg.metrics_host, cfg.metrics_port, registry, health)
    return metrics_http.serve(cfg.metrics_host, cfg.metrics_port, registry, health)


async def main(cfg: EngineConfig) -> None:
    """Fetch the model if no path was given, build the engine and serve until SIGTERM/SIGINT."""
    registry = CollectorRegistry()
    health = metrics_http.HealthState()
    http = _metrics_server(cfg, registry, health)
    stop = asyncio.Event()
    install_stop_signals(stop)
    try:
        state_dir = Path(cfg.state_dir or default_state_dir())
        cfg = msgspec.structs.replace(cfg, adapter_cache_dir=cfg.adapter_cache_dir or str(state_dir / "adapters"))
        try:
            cfg = resolve_auto(await with_model_path(cfg, state_dir))
        except ModelUnavailable as exc:
            raise SystemExit(f"engine: {exc}") from None
        # Models loaded at run time (control subject ``load``) are built the same way, from a copy of cfg.
        with gc_heap.paused():  # imports the backend's libraries: every object stays
            backend = build_backend(cfg)
        service = EngineService(cfg, backend, EngineMetrics(registry), factory=build_backend, state_dir=state_dir)
        health.check = lambda: _health(service)
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, service.stop_taking_work)
        await service.run(stop)
    finally:
        if http is not None:
            http.shutdown()


def cli() -> None:
    """Entry point."""
    cfg = parse_args()
    setup_logging("engine")
    run(lambda: main(cfg))


if __name__ == "__main__":
    cli()
