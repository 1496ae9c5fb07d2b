"""The engine on the bus: dispatch replies, event streams, heartbeats, cancel, draining."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import msgspec
import pytest

from schemas import names
from schemas.events import StreamEnd, StreamError, StreamStart, TokenDelta, decode_event, encode
from schemas.heartbeat import EngineHeartbeat
from schemas.inference import (CancelRequest, ChatMessage, DispatchReply, InferenceRequest, SamplingParams,
                              StructuredOutput)
from services.common import bus
from services.engine.__main__ import build_backend
from services.engine.config import parse_args
from services.engine.metrics import EngineMetrics
from services.engine.service import EngineService
from prometheus_client import CollectorRegistry


@contextlib.asynccontextmanager
async def serving(argv: list[str], timeout: float = 60.0, **service_args):
    """An engine service of ``argv`` (its worker id added) serving in this loop while the block runs:
    ``(service, worker)``; ``service_args`` go to ``EngineService``."""
    worker = f"w-{uuid.uuid4().hex[:8]}"
    cfg = parse_args([*argv, "--worker-id", worker])
    service = EngineService(cfg, build_backend(cfg), EngineMetrics(CollectorRegistry()), **service_args)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        await until_serving(service, task)
        yield service, worker
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout)


def running_engine(nats_url: str, *extra: str):
    """A simulated engine serving ``sim`` (alias ``sim-alias``)."""
    return serving(["--nats-url", nats_url, "--engine", "simulated", "--model-id", "sim", "--alias", "sim-alias",
                    "--heartbeat-interval", "0.2", *extra], timeout=30)


async def until_serving(service: EngineService, task: asyncio.Task, timeout: float = 60.0) -> None:
    """Wait until ``service`` (run by ``task``) answers dispatches; raise what ended ``task`` if it ended first."""
    ready = asyncio.ensure_future(service.ready.wait())
    try:
        await asyncio.wait({ready, task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        ready.cancel()
    if task.done():
        task.result()
        raise AssertionError("the engine service stopped before it served")
    assert service.ready.is_set(), f"the engine service was not serving within {timeout}s"


async def withdraw_before_dispatch(nc, service: EngineService, worker: str, req: InferenceRequest,
                                   patience: float = 5.0) -> None:
    """Withdraw ``req``'s offer from ``worker`` and wait until the engine holds the tombstone.

    Sent again until it does: right after start an engine's new subscriptions were not always
    matched yet (see ``dispatch``), and a withdrawal that reached nobody is lost without a word.
    """
    deadline = time.monotonic() + patience
    withdrawal = encode(CancelRequest(id=req.id, reason="dispatch_timeout", dispatch=req.dispatch))
    while service._offers.refusal(req, worker) is None:
        assert time.monotonic() < deadline, "the engine never read the withdrawal"
        await nc.publish(names.engine_cancel(worker), withdrawal)
        await bus.flush(nc)
        await asyncio.sleep(0.05)


def request(inbox: str, max_tokens: int = 5, model: str = "sim", **kw) -> InferenceRequest:
    return InferenceRequest(id=f"r-{uuid.uuid4().hex[:10]}", model=model, reply_to=inbox,
                            messages=[ChatMessage(role="user", content="one two three")],
                            sampling=SamplingParams(max_tokens=max_tokens, **kw))


async def dispatch(nc, worker: str, req: InferenceRequest) -> DispatchReply:
    """Offer ``req`` to ``worker`` and return its answer.

    No retry on "no responders": an engine is ready once its subscriptions are on the server
    (``bus.flush``; nats-py's own flush did not prove that, which twice in CI left an engine's
    first offer unanswered).
    """
    msg = await nc.request(names.engine_generate(worker), encode(req), timeout=2)
    return msgspec.json.decode(msg.data, type=DispatchReply)


async def events_until_terminal(sub, timeout: float = 10.0) -> list:
    out = []
    while True:
        msg = await sub.next_msg(timeout=timeout)
        ev = decode_event(msg.data)
        out.append(ev)
        if isinstance(ev, (StreamEnd, StreamError)):
            return out


async def test_dispatch_streams_ordered_events_to_the_reply_subject(nc, nats_server):
    async with running_engine(nats_server.url) as (_, worker):
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        reply = await dispatch(nc, worker, request(inbox, max_tokens=5))
        assert reply.accepted and reply.worker == worker and reply.in_flight == 1
        events = await events_until_terminal(sub)
        assert isinstance(events[0], StreamStart) and events[0].worker == worker and events[0].model == "sim"
        deltas = [e for e in events if isinstance(e, TokenDelta)]
        assert [d.seq for d in deltas] == list(range(1, 6))
        assert "".join(d.text for d in deltas) == "tok1 tok2 tok3 tok4 tok5 "
        end = events[-1]
        assert isinstance(end, StreamEnd) and end.seq == 6 and end.finish_reason == "length"
        assert end.usage.completion_tokens == 5 and end.usage.prompt_tokens == 3


async def test_alias_unknown_model_and_full_slots(nc, nats_server):
    async with running_engine(nats_server.url, "--slots", "1", "--sim-token-rate", "20", "--drain-timeout", "0.2") as (_, worker):
        inbox = nc.new_inbox()
        await nc.subscribe(inbox)
        unknown = await dispatch(nc, worker, request(inbox, model="nope"))
        assert not unknown.accepted and unknown.code == "model_not_found"
        first = await dispatch(nc, worker, request(inbox, max_tokens=100, model="sim-alias"))
        assert first.accepted
        busy = await dispatch(nc, worker, request(inbox))
        assert not busy.accepted and busy.code == "engine_busy"


async def test_a_request_the_engine_cannot_constrain_is_refused_before_it_is_accepted(nc, nats_server):
    async with running_engine(nats_server.url) as (service, worker):
        inbox = nc.new_inbox()
        await nc.subscribe(inbox)
        refused = await dispatch(nc, worker, msgspec.structs.replace(
            request(inbox), structured=StructuredOutput(kind="json_object")))
        assert not refused.accepted and refused.code == "unsupported" and "response_format" in refused.message
        biased = await dispatch(nc, worker, request(inbox, logit_bias={3: 1.0}))
        assert not biased.accepted and biased.code == "unsupported"
        assert not service._active  # nothing was started


async def test_heartbeats_on_subject_and_in_kv(nc, nats_server, js):
    sub = await nc.subscribe(names.WORKER_STATUS_ALL)
    async with running_engine(nats_server.url) as (_, worker):
        hb = msgspec.json.decode((await sub.next_msg(timeout=2)).data, type=EngineHeartbeat)
        assert hb.worker == worker and hb.engine == "simulated" and hb.models[0].id == "sim"
        assert hb.models[0].aliases == ["sim-alias"] and hb.slots == 8 and hb.memory_bytes > 0
        kv = await js.key_value(names.WORKERS_BUCKET)
        entry = await kv.get(worker)
        assert msgspec.json.decode(entry.value, type=EngineHeartbeat).worker == worker
    # Stopping advertises draining, then removes the KV entry.
    seen_draining = False
    with contextlib.suppress(Exception):
        while True:
            hb = msgspec.json.decode((await sub.next_msg(timeout=0.5)).data, type=EngineHeartbeat)
            seen_draining = seen_draining or hb.draining
    assert seen_draining
    with pytest.raises(Exception):
        await kv.get(worker)


async def test_cancel_stops_generation_and_frees_the_slot(nc, nats_server):
    async with running_engine(nats_server.url, "--slots", "1", "--sim-token-rate", "50") as (service, worker):
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        req = request(inbox, max_tokens=10_000)
        assert (await dispatch(nc, worker, req)).accepted
        await sub.next_msg(timeout=2)  # start
        await sub.next_msg(timeout=2)  # first token
        await nc.publish(names.INFER_CANCEL, encode(CancelRequest(id=req.id, reason="client_disconnected")))
        events = await events_until_terminal(sub, timeout=2)
        assert isinstance(events[-1], StreamError) and events[-1].code == "cancelled"
        assert not service._active
        assert (await dispatch(nc, worker, request(inbox))).accepted


async def test_an_offer_withdrawn_before_the_engine_reads_it_is_refused_and_a_newer_offer_runs(nc, nats_server):
    # A withdrawn offer: the scheduler stopped waiting for this engine and withdrew the offer; the engine reads the
    # offer only afterwards (its loop was blocked). It must refuse it and publish nothing for it.
    async with running_engine(nats_server.url) as (service, worker):
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        req = request(inbox, max_tokens=3)
        await withdraw_before_dispatch(nc, service, worker, req)
        refused = await dispatch(nc, worker, req)
        assert not refused.accepted and refused.code == "cancelled"
        assert (await dispatch(nc, worker, msgspec.structs.replace(req, dispatch=1))).accepted  # a newer offer
        events = await events_until_terminal(sub)
        assert isinstance(events[0], StreamStart) and isinstance(events[-1], StreamEnd)
        assert [e.dispatch for e in events] == [1] * len(events)  # nothing from the refused offer
        assert sum(isinstance(e, TokenDelta) for e in events) == 3


async def test_a_withdrawn_offer_under_way_stops_without_a_terminal_event(nc, nats_server):
    async with running_engine(nats_server.url, "--sim-token-rate", "50") as (service, worker):
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        req = request(inbox, max_tokens=10_000)
        assert (await dispatch(nc, worker, req)).accepted
        assert isinstance(decode_event((await sub.next_msg(timeout=2)).data), StreamStart)
        await sub.next_msg(timeout=2)  # first token
        await nc.publish(names.engine_cancel(worker), encode(CancelRequest(id=req.id, reason="stray_dispatch")))
        for _ in range(200):
            if not service._active:
                break
            await asyncio.sleep(0.01)
        assert not service._active
        # The probe is answered after anything the run published (one connection, in order).
        probe = msgspec.structs.replace(req, probe=True)
        assert (await dispatch(nc, worker, probe)).accepted  # it ran here (a redelivery would not start it)
        left = []
        while sub.pending_msgs:  # already here: next_msg does not wait
            left.append(decode_event((await sub.next_msg(timeout=1)).data))
        assert all(isinstance(e, TokenDelta) for e in left), left  # no StreamError/StreamEnd for the withdrawn run
        refused = await dispatch(nc, worker, req)
        assert not refused.accepted and refused.code == "cancelled"


async def test_redispatch_of_a_running_request_is_idempotent(nc, nats_server):
    async with running_engine(nats_server.url, "--sim-token-rate", "50") as (service, worker):
        inbox = nc.new_inbox()
        await nc.subscribe(inbox)
        req = request(inbox, max_tokens=50)
        assert (await dispatch(nc, worker, req)).accepted
        again = await dispatch(nc, worker, req)
        assert again.accepted and again.in_flight == 1 and len(service._active) == 1


async def test_stop_taking_work_refuses_new_requests_and_lets_slow_ones_finish(nc, nats_server):
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    beats: list[EngineHeartbeat] = []
    async with running_engine(nats_server.url, "--sim-token-rate", "20", "--drain-timeout", "0.5") as (service, worker):
        async def on_beat(msg) -> None:
            beats.append(msgspec.json.decode(msg.data, type=EngineHeartbeat))

        await nc.subscribe(names.worker_status(worker), cb=on_beat)
        assert (await dispatch(nc, worker, request(inbox, max_tokens=30))).accepted
        await sub.next_msg(timeout=2)

        service.stop_taking_work()  # what SIGUSR1 does

        refused = await dispatch(nc, worker, request(nc.new_inbox()))
        assert not refused.accepted and refused.code == "engine_busy"
        # Longer than the drain timeout: the engine is not stopping, its request runs to the end.
        events = await events_until_terminal(sub, timeout=10)
        assert isinstance(events[-1], StreamEnd) and events[-1].usage.completion_tokens == 30
        assert await _eventually(lambda: any(b.draining and b.in_flight == 0 for b in beats))
        assert service.draining


async def _eventually(check, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def test_sigterm_drain_finishes_in_flight_requests(nc, nats_server):
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    async with running_engine(nats_server.url, "--sim-token-rate", "100") as (_, worker):
        assert (await dispatch(nc, worker, request(inbox, max_tokens=30))).accepted
        await sub.next_msg(timeout=2)
    # The context exit stopped the engine; the request had to finish completely first.
    events = await events_until_terminal(sub, timeout=5)
    assert isinstance(events[-1], StreamEnd) and events[-1].usage.completion_tokens == 30
