"""Shared fixtures and helpers of the scheduler's service tests (no tests here).

The test plays the engines on the bus with ``tests.engine_double.EngineDouble``
and runs real schedulers in-process against the per-test nats-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable

import msgspec
import nats
import pytest
from nats.aio.client import Client
from prometheus_client import CollectorRegistry

from schemas import names
from schemas.events import StreamError, decode_event, encode
from schemas.inference import InferenceRequest
from services.scheduler.config import SchedulerConfig
from tests.engine_double import EngineDouble
from services.scheduler.service import Scheduler

# Heartbeats every 0.2 s in tests, so "three missed intervals" is 0.6 s.
INTERVAL = 0.2
FAST = dict(expire_interval=0.05, stats_interval=0.5, retry_delay=0.1, dispatch_timeout=1.0,
            drain_timeout=3.0)


async def eventually(check: Callable[[], bool], timeout: float = 3.0, what: str = "condition") -> None:
    """Wait until ``check()`` is true, polling every 10 ms; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def new_request(*, model: str = "test-model", reply_to: str | None = None, **fields) -> InferenceRequest:
    """A minimal completion request with a unique id."""
    rid = fields.pop("id", None) or f"req-{uuid.uuid4().hex[:12]}"
    return InferenceRequest(id=rid, model=model, reply_to=reply_to or names.reply_inbox("test", rid), prompt="hello",
                            created=time.time(), **fields)


async def submit(nc: Client, req: InferenceRequest, lane: str = "normal") -> InferenceRequest:
    """Put ``req`` on the queue the way the edge does (JetStream publish, acknowledged)."""
    await nc.jetstream().publish(names.infer_submit(lane), encode(req))
    return req


async def stream_messages(nc: Client) -> int:
    """Messages stored in the inference queue (what ``nats stream info LLM_INFER`` shows)."""
    return (await nc.jetstream().stream_info(names.INFER_STREAM)).state.messages


async def until_stream_holds(nc: Client, expected: int, timeout: float = 3.0) -> None:
    """Wait until the inference queue holds ``expected`` messages (acks travel on another connection)."""
    deadline = time.monotonic() + timeout
    while (held := await stream_messages(nc)) != expected:
        if time.monotonic() > deadline:
            pytest.fail(f"the inference queue holds {held} messages, expected {expected}")
        await asyncio.sleep(0.01)


class ReplyInbox:
    """A subscription on a fresh inbox, collecting the stream events published to it."""

    def __init__(self, nc: Client) -> None:
        self.subject = nc.new_inbox()
        self.events: list = []
        self._nc = nc

    async def __aenter__(self) -> ReplyInbox:
        async def collect(msg) -> None:
            self.events.append(decode_event(msg.data))
        self._sub = await self._nc.subscribe(self.subject, cb=collect)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._sub.unsubscribe()

    async def error(self, timeout: float = 3.0) -> StreamError:
        """The first event, which must be a ``StreamError``."""
        await eventually(lambda: bool(self.events), timeout, "an event on the reply subject")
        event = self.events[0]
        assert isinstance(event, StreamError), event
        return event


@pytest.fixture
def start_scheduler(nats_server, nc) -> Callable[..., contextlib.AbstractAsyncContextManager[Scheduler]]:
    """Run a scheduler on its own connection: ``async with start_scheduler(**config) as s:``."""

    @contextlib.asynccontextmanager
    async def run(**overrides) -> AsyncIterator[Scheduler]:
        cfg = msgspec.convert({"nats_url": nats_server.url, **FAST, **overrides}, SchedulerConfig)
        own = await nats.connect(nats_server.url, name="scheduler-under-test")
        try:
            async with Scheduler(own, cfg, CollectorRegistry()) as scheduler:
                yield scheduler
        finally:
            await own.drain()

    return run


@pytest.fixture
async def engines(nc) -> AsyncIterator[Callable[..., EngineDouble]]:
    """Make engine doubles on the test's connection: ``await engines("a", slots=2)``; all stopped at the end.

    ``heartbeat=False`` leaves an engine silent (it still answers dispatches).
    """
    made: list[EngineDouble] = []

    async def make(worker: str, *, heartbeat: bool = True, **kw) -> EngineDouble:
        kw.setdefault("interval", INTERVAL)
        engine = EngineDouble(nc, f"{worker}-{uuid.uuid4().hex[:6]}", **kw)
        made.append(engine)
        return await engine.start(heartbeat=heartbeat)

    yield make
    for engine in made:
        await engine.stop()


async def known(scheduler: Scheduler, *engines: EngineDouble) -> None:
    """Wait until the scheduler's worker table has every one of ``engines`` with its current load."""
    def ok() -> bool:
        states = [scheduler.table.get(e.worker) for e in engines]
        return all(s is not None and s.in_flight == e.in_flight for s, e in zip(states, engines, strict=True))
    await eventually(ok, what="the scheduler to see the engines' heartbeats")


def count(scheduler: Scheduler, outcome: str, lane: str = "normal") -> float:
    """``llm_scheduler_inference_requests_total{lane, outcome}`` of ``scheduler``."""
    value = scheduler.metrics.registry.get_sample_value("llm_scheduler_inference_requests_total",
                                                        {"lane": lane, "outcome": outcome})
    return value or 0.0
