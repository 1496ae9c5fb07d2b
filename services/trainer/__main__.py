"""``python -m services.trainer``: run one trainer."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry

from schemas import names
from services.common import bus, bus_permissions, metrics_http
from services.common.lifecycle import install_stop_signals, run, setup_logging
from services.trainer.config import TrainerConfig, parse_args
from services.trainer.metrics import TrainerMetrics
from services.trainer.service import TrainerService

log = logging.getLogger("services.trainer")


async def main(cfg: TrainerConfig) -> None:
    """Take jobs until SIGTERM/SIGINT; a job running then goes back to the queue at its last checkpoint."""
    registry = CollectorRegistry()
    health = metrics_http.HealthState()
    http = metrics_http.serve(cfg.metrics_host, cfg.metrics_port, registry, health) if cfg.metrics_port else None
    stop = asyncio.Event()
    install_stop_signals(stop)
    try:
        nc = await bus.connect(cfg, name=f"cy-trainer {cfg.trainer_id}",
                               inbox=names.identity_inbox(bus_permissions.TRAINER))
        health.check = lambda: metrics_http.nats_health(nc, trainer=cfg.trainer_id)
        try:
            await TrainerService(nc, cfg, TrainerMetrics(registry)).run(stop)
        finally:
            await bus.drain(nc)
    finally:
        if http is not None:
            http.shutdown()


def cli() -> None:
    """Entry point."""
    cfg = parse_args()
    setup_logging("trainer")
    run(lambda: main(cfg))


if __name__ == "__main__":
    cli()
