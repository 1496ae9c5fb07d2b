"""``python -m services.scheduler --nats-url URL[,URL...] [--metrics-port N]``: run one scheduler replica.

SIGTERM/SIGINT: stop taking work, finish dispatches under way, drain the connection, exit 0.
A second signal is a no-op. Exit status 1 if the scheduler cannot start or a loop crashes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from wsgiref.simple_server import WSGIServer

from nats.aio.client import Client
from prometheus_client import CollectorRegistry

from schemas import names
from services.common import bus, bus_permissions, gc_heap, lifecycle, metrics_http
from services.scheduler.config import SchedulerConfig, parse_args
from services.scheduler.service import ConsumerMissing, Scheduler

log = logging.getLogger("services.scheduler")


class MetricsPortBusy(RuntimeError):
    """``--metrics-port`` cannot be bound."""


def _serve_metrics(host: str, port: int, registry: CollectorRegistry,
                   health: metrics_http.HealthState) -> WSGIServer:
    try:
        server = metrics_http.serve(host, port, registry, health)
    except OSError as exc:
        raise MetricsPortBusy(f"cannot serve metrics on {host}:{port}: {exc}") from exc
    log.info("metrics on %s:%d/metrics, health on /healthz", host, port)
    return server


async def _until(*events: asyncio.Event) -> None:
    """Return as soon as any of ``events`` is set."""
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


async def _connect(options: bus.NatsOptions, stop: asyncio.Event) -> Client | None:
    """Connect to NATS (retrying while it is down); ``None`` if told to stop first."""
    connecting = asyncio.create_task(bus.connect(options, name="cy-scheduler",
                                                 inbox=names.identity_inbox(bus_permissions.SCHEDULER)))
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait([connecting, stopped], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if connecting.done():
        return connecting.result()
    connecting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await connecting
    log.info("stopped before NATS at %s answered", options.nats_url)
    return None


def _health(nc: Client, scheduler: Scheduler) -> tuple[bool, dict]:
    """Ready while connected to NATS and no loop of the scheduler has crashed."""
    if scheduler.failed.is_set():
        return False, {"status": "failed"}
    return metrics_http.nats_health(nc)


async def serve(config: SchedulerConfig) -> int:
    """Run until a stop signal (0) or a crashed loop (1)."""
    stop = asyncio.Event()
    lifecycle.install_stop_signals(stop)
    registry = CollectorRegistry()
    health = metrics_http.HealthState()
    http = _serve_metrics(config.metrics_host, config.metrics_port, registry, health) if config.metrics_port else None
    try:
        nc = await _connect(config, stop)
        if nc is None:
            return 0
        try:
            async with Scheduler(nc, config, registry) as scheduler:
                health.check = lambda: _health(nc, scheduler)
                gc_heap.started(scheduler.metrics.gc_pause)
                await _until(stop, scheduler.failed)
                code = 1 if scheduler.failed.is_set() else 0
        finally:
            await bus.drain(nc)
    finally:
        if http is not None:
            http.shutdown()
    log.info("scheduler stopped")
    return code


def main(argv: list[str] | None = None) -> None:
    """Parse the configuration once, then run the scheduler on uvloop when available."""
    config = parse_args(argv)
    lifecycle.setup_logging("scheduler")
    result: list[int] = []

    async def run() -> None:
        result.append(await serve(config))

    try:
        lifecycle.run(run)
    except (ConsumerMissing, MetricsPortBusy) as exc:
        log.error("%s", exc)
        sys.exit(1)
    sys.exit(result[0] if result else 1)


if __name__ == "__main__":
    main()
