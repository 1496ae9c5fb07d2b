"""API keys' NATS-native producers are held to the key's limits by the scheduler, in the edge's budget.

A real nats-server whose users are the scheduler's and one API key's producer (their real
permission sets) plus a harness user for the test's own plumbing; a real scheduler in-process; an
engine double taking dispatches. Per-minute budgets are counted on a frozen clock (shared with the
edge's limiter here), so no test straddles a minute boundary.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import nats
import pytest
from prometheus_client import CollectorRegistry

from infra import provision
from schemas import names
from schemas.auth import ApiKeyRecord
from schemas.errors import ErrorCode
from schemas.events import StreamError, encode
from services.cli.up import NATS_CONFIG
from services.common import bus_auth, bus_permissions, rate_counters, rate_window
from services.common.bus_permissions import Permissions
from services.common.natsserver import NatsServer
from services.common.rate_window import RateLimits
from services.edge.auth.rate_limit import RateLimited, RateLimiter
from services.edge.metrics import EdgeMetrics
from services.scheduler.config import SchedulerConfig
from services.scheduler.service import Scheduler
from tests.scheduler.test_scheduler_harness import FAST, ReplyInbox, eventually, new_request
from tests.engine_double import EngineDouble
from tests.support import frozen_minute

KEY = "a1b2c3d4e5f6"
REVOKED = "0f0e0d0c0b0a"
HARNESS = Permissions("harness", "_INBOX.harness", (">",), (">",), description="the test's own plumbing")


@dataclass
class Bus:
    """The server, the harness connection and the seed of each real identity."""

    server: NatsServer
    harness: nats.NATS
    seeds: dict[str, Path]


@pytest.fixture
async def bus(tmp_path: Path) -> AsyncIterator[Bus]:
    perms = {"scheduler": bus_permissions.scheduler(), "harness": HARNESS,
             "key": bus_permissions.key_producer(KEY, ["inference"])}
    seeds = {name: bus_auth.ensure_seed(tmp_path / "nkeys", name) for name in perms}
    config = bus_auth.write_server_config(NATS_CONFIG, tmp_path / "server.conf", seeds, perms)
    server = NatsServer(tmp_path / "nats", config=config, log_file=tmp_path / "nats.log").start()
    harness = await nats.connect(server.url, nkeys_seed=str(seeds["harness"]))
    try:
        await provision.apply(harness.jetstream())
        kv = await harness.jetstream().key_value(names.API_KEYS_BUCKET)
        for key_id, revoked in ((KEY, False), (REVOKED, True)):
            record = ApiKeyRecord(id=key_id, name=key_id, hash="0" * 64, scopes=["inference"], created=time.time(),
                                  revoked=revoked, rate_rpm=2, rate_tpm=1000)
            await kv.create(key_id, msgspec.json.encode(record))
        yield Bus(server, harness, seeds)
    finally:
        await harness.close()
        server.stop()


@pytest.fixture
async def running(bus: Bus) -> AsyncIterator[tuple[Scheduler, EngineDouble, object]]:
    """A scheduler on its own NATS user, an engine double, and the frozen clock they count on."""
    clock = frozen_minute()
    own = await nats.connect(bus.server.url, nkeys_seed=str(bus.seeds["scheduler"]),
                             inbox_prefix=names.identity_inbox(bus_permissions.SCHEDULER))
    engine = await EngineDouble(bus.harness, f"w-{uuid.uuid4().hex[:6]}", slots=8).start()
    cfg = msgspec.convert({"nats_url": bus.server.url, **FAST}, SchedulerConfig)
    try:
        async with Scheduler(own, cfg, CollectorRegistry(), rate_clock=clock) as scheduler:
            await eventually(lambda: scheduler.table.get(engine.worker) is not None, what="the engine's heartbeat")
            yield scheduler, engine, clock
    finally:
        await engine.stop()
        await own.drain()


async def _producer(bus: Bus, violations: list[str] | None = None) -> nats.NATS:
    async def on_error(exc: Exception) -> None:
        if violations is not None:
            violations.append(str(exc))

    return await nats.connect(bus.server.url, nkeys_seed=str(bus.seeds["key"]), error_cb=on_error,
                              inbox_prefix=names.identity_inbox(KEY))


async def test_an_over_limit_request_gets_a_typed_error_and_http_and_bus_share_one_budget(bus: Bus, running):
    scheduler, engine, clock = running
    # One HTTP request of the key, admitted by the edge's limiter: the first of its 2 per minute.
    limiter = RateLimiter(bus.harness.jetstream(), RateLimits(), EdgeMetrics(CollectorRegistry()), timeout=2.0,
                          retry_after=1, clock=clock)
    await limiter.admit(rate_counters.caller_of_key(KEY), RateLimits(rpm=2), stream=False)

    producer = await _producer(bus)
    try:
        async with ReplyInbox(producer) as first_inbox, ReplyInbox(producer) as second_inbox:
            first = new_request(reply_to=first_inbox.subject, rate_caller="key-someone-else",
                                reply_socket="edge-of-someone-else")
            ack = await producer.jetstream().publish(names.infer_keyed(KEY, "normal"), encode(first))
            assert ack.stream == names.INFER_KEYED_STREAM
            await eventually(lambda: first.id in engine.received_ids, what="the engine to get the admitted request")
            # Charged to the key the server authenticated, not to what the producer wrote.
            assert engine.received[-1].rate_caller == rate_counters.caller_of_key(KEY)
            # And it names no edge's reply socket: the engine answers on the key's own inbox.
            assert engine.received[-1].reply_socket == ""

            second = new_request(reply_to=second_inbox.subject)
            await producer.jetstream().publish(names.infer_keyed(KEY, "normal"), encode(second))
            error = await second_inbox.error()
            assert error.code == ErrorCode.RATE_LIMITED and "2 requests per minute" in error.message, error
            assert engine.received_ids == [first.id] and first_inbox.events == []
    finally:
        await producer.close()
    window, _ = rate_window.minute_window(clock())
    counters = rate_counters.CounterStore(bus.harness.jetstream(), timeout=2.0)
    assert await counters.total(names.rate_counter(rate_counters.caller_of_key(KEY), "requests", window)) == 2
    # ... and the edge now refuses the key's next HTTP request too.
    with pytest.raises(RateLimited):
        await limiter.admit(rate_counters.caller_of_key(KEY), RateLimits(rpm=2), stream=False)
    assert scheduler.metrics.registry.get_sample_value(
        "llm_scheduler_inference_requests_total", {"lane": "normal", "outcome": "rate_limited"}) == 1


async def test_tokens_the_key_spent_elsewhere_count_against_its_bus_requests(bus: Bus, running):
    _, engine, clock = running
    # What an engine charges when a request of the key ends (or the edge, for an HTTP one).
    await rate_counters.charge_tokens(bus.harness.jetstream(), rate_counters.caller_of_key(KEY), 1000, clock())
    producer = await _producer(bus)
    try:
        async with ReplyInbox(producer) as inbox:
            req = new_request(reply_to=inbox.subject)
            await producer.jetstream().publish(names.infer_keyed(KEY, "high"), encode(req))
            error = await inbox.error()
            assert error.code == ErrorCode.RATE_LIMITED and "1000 tokens per minute" in error.message, error
    finally:
        await producer.close()
    assert engine.received_ids == []


async def test_a_revoked_key_is_refused(bus: Bus, running):
    _, engine, _ = running
    perms = bus_permissions.key_producer(REVOKED, ["inference"])
    # The revoked key's user is gone from the server; its subject is still checked should a message get there.
    async with ReplyInbox(bus.harness) as inbox:
        req = new_request(reply_to=inbox.subject)
        await bus.harness.jetstream().publish(perms.publish[1], encode(req))
        error = await inbox.error()
    assert isinstance(error, StreamError) and error.code == ErrorCode.INVALID_API_KEY and "revoked" in error.message
    assert engine.received_ids == []


async def test_a_key_producer_cannot_go_around_admission(bus: Bus, running):
    violations: list[str] = []
    producer = await _producer(bus, violations)
    try:
        for subject in (names.infer_submit("normal"), names.infer_keyed("ffffffffffff", "normal")):
            with pytest.raises(nats.errors.TimeoutError):  # refused by the server: no stream acknowledges it
                await producer.jetstream().publish(subject, encode(new_request()), timeout=1.0)
        await eventually(lambda: len(violations) == 2, what="the server to report both refusals")
    finally:
        await producer.close()
    assert all("permissions violation" in v.lower() for v in violations), violations
    assert (await bus.harness.jetstream().stream_info(names.INFER_STREAM)).state.messages == 0
