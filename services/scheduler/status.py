"""The scheduler's NATS micro service: ``nats micro ls/info/stats cy-scheduler`` and a ``status`` endpoint.

``status`` (subject ``cy-scheduler.status``, answered by any one replica) returns that replica's
``SchedulerStatus`` as JSON: its worker table, free capacity, lane estimates and request
counters. ``nats micro stats cy-scheduler`` shows the same per replica as endpoint data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib.metadata import PackageNotFoundError, version

import msgspec
from nats import micro
from nats.aio.client import Client
from nats.micro.request import Request
from nats.micro.service import EndpointStats, Service

from schemas import names
from services.common.worker_table import WorkerTable
from services.scheduler.strategies import effective_free

STATUS_ENDPOINT = "status"
STATUS_SUBJECT = names.SCHEDULER_STATUS
assert STATUS_SUBJECT == f"{names.MICRO_SCHEDULER}.{STATUS_ENDPOINT}"  # what nats.micro builds: group, endpoint


class WorkerView(msgspec.Struct, kw_only=True):
    """One engine as this scheduler sees it."""

    worker: str
    engine: str
    device: str
    models: list[str]
    slots: int
    in_flight: int
    reserved: int
    free: int
    draining: bool
    seen_ago: float
    health: str = "ok"  # the engine's own health checks (``schemas.heartbeat.Health``), and why when not ok
    health_reason: str = ""


class SchedulerStatus(msgspec.Struct, kw_only=True):
    """A snapshot of one scheduler replica."""

    instance: str
    capacity: int
    dispatching: int
    lanes: dict[str, int]
    requests: dict[str, dict[str, int]]
    workers: list[WorkerView]
    strategy: str = ""      # the routing strategy in force on this replica
    circuits_open: int = 0  # engines whose circuit breaker is open or half-open


def worker_views(table: WorkerTable, reserved: Mapping[str, int], now: float) -> list[WorkerView]:
    """The live engines of ``table``, sorted by id (``now`` on the table's monotonic clock)."""
    views = []
    for s in sorted(table.live(), key=lambda s: s.worker):
        hb = s.heartbeat
        views.append(WorkerView(worker=s.worker, engine=hb.engine, device=hb.device,
                                models=[m.id for m in hb.models], slots=hb.slots, in_flight=s.in_flight,
                                reserved=reserved.get(s.worker, 0), free=effective_free(s, reserved),
                                draining=hb.draining, seen_ago=round(now - s.last_seen, 3), health=hb.health,
                                health_reason=hb.health_reason))
    return views


def _service_version() -> str:
    try:
        return version("cy-llm")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0"


async def register(nc: Client, snapshot: Callable[[], SchedulerStatus]) -> Service:
    """Register the micro service and its ``status`` endpoint; stop it with ``await service.stop()``."""

    async def status(req: Request) -> None:
        await req.respond(msgspec.json.encode(snapshot()))

    def stats(_: EndpointStats) -> object:
        return msgspec.to_builtins(snapshot())

    svc = await micro.add_service(nc, name=names.MICRO_SCHEDULER, version=_service_version(),
                                  description="Takes inference requests off JetStream by priority and "
                                              "dispatches them to engines", stats_handler=stats)
    await svc.add_group(name=names.MICRO_SCHEDULER).add_endpoint(name=STATUS_ENDPOINT, handler=status)
    return svc
