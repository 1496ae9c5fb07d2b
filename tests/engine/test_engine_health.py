"""Engine health is checked, not assumed: the verdict of the backends' checks, the heartbeat that carries
it, and a transformers engine whose model thread died ending its requests at once."""

from __future__ import annotations

import asyncio
import uuid

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from schemas import names
from schemas.errors import BusError, ErrorCode
from schemas.events import StreamError, StreamStart, TokenDelta, decode_event
from schemas.heartbeat import EngineHeartbeat, Health
from schemas.inference import ChatMessage, InferenceRequest, SamplingParams
from services.engine.__main__ import build_backend
from services.engine.config import parse_args
from services.engine.health import check_backends
from services.engine.metrics import EngineMetrics
from services.engine.service import EngineService
from tests.engine.test_engine_service import dispatch, until_serving


class _Checked:
    """A backend as far as ``check_backends`` sees one: only its ``check_health``."""

    def __init__(self, failure: BaseException | None = None, hang: bool = False) -> None:
        self._failure = failure
        self._hang = hang

    async def check_health(self) -> None:
        if self._hang:
            await asyncio.Event().wait()
        if self._failure is not None:
            raise self._failure


async def test_every_backend_passing_is_ok():
    assert (await check_backends([("a", _Checked()), ("b", _Checked())], timeout=1)).health is Health.OK


async def test_a_backend_that_raises_fails_the_engine_naming_the_model_and_the_cause():
    state = await check_backends([("a", _Checked()),
                                  ("b", _Checked(BusError(ErrorCode.ENGINE_FAILED, "model thread is not running")))],
                                 timeout=1)
    assert state.failed and state.reason == "b: model thread is not running"
    state = await check_backends([("c", _Checked(RuntimeError("CUDA error: device lost")))], timeout=1)
    assert state.failed and "c: RuntimeError: CUDA error: device lost" in state.reason


async def test_a_check_that_does_not_answer_degrades_the_engine_but_does_not_fail_it():
    state = await check_backends([("a", _Checked(hang=True))], timeout=0.05)
    assert state.health is Health.DEGRADED and "a" in state.reason and not state.failed


def test_a_heartbeat_without_health_decodes_as_ok_and_the_new_fields_round_trip():
    old = b'{"worker":"w","engine":"e","device":"cpu","models":[],"slots":1,"in_flight":0,"seq":1,"ts":1.0}'
    hb = msgspec.json.decode(old, type=EngineHeartbeat)
    assert hb.health == Health.OK and hb.health_reason == ""
    failed = msgspec.structs.replace(hb, health=Health.FAILED.value, health_reason="thread died")
    again = msgspec.json.decode(msgspec.json.encode(failed), type=EngineHeartbeat)
    assert (again.health, again.health_reason) == ("failed", "thread died")


def _request(inbox: str, max_tokens: int) -> InferenceRequest:
    return InferenceRequest(id=f"r-{uuid.uuid4().hex[:10]}", model="smol", reply_to=inbox,
                            messages=[ChatMessage(role="user", content="Write a long story about a brave cat.")],
                            sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0))


@pytest.mark.slow
async def test_a_dead_model_thread_ends_its_requests_and_the_engine_heartbeats_failed(nc, nats_server,
                                                                                      default_model_dir):
    worker = f"w-{uuid.uuid4().hex[:8]}"
    cfg = parse_args(["--nats-url", nats_server.url, "--engine", "transformers", "--model-id", "smol",
                      "--model-path", str(default_model_dir), "--worker-id", worker, "--heartbeat-interval", "0.2",
                      "--slots", "2"])
    metrics = EngineMetrics(CollectorRegistry())
    backend = build_backend(cfg)
    service = EngineService(cfg, backend, metrics)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    beats = await nc.subscribe(names.worker_status(worker))
    try:
        await until_serving(service, task, timeout=180)
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        req = _request(inbox, max_tokens=10_000)  # would run for minutes: only the failure can end it
        assert (await dispatch(nc, worker, req)).accepted
        assert isinstance(decode_event((await sub.next_msg(timeout=10)).data), StreamStart)
        assert isinstance(decode_event((await sub.next_msg(timeout=60)).data), TokenDelta)
        backend._batcher.stop()  # the model thread exits with the request still in it: it dies under it

        # The request ends with a typed, failover-able error naming the cause (not at its deadline).
        while not isinstance(event := decode_event((await sub.next_msg(timeout=30)).data), StreamError):
            assert isinstance(event, TokenDelta)
        assert event.code == ErrorCode.ENGINE_FAILED and "model thread is not running" in event.message
        # The heartbeats say so, with the reason, once the request is gone too; new work is refused, typed.
        while True:
            hb = msgspec.json.decode((await beats.next_msg(timeout=10)).data, type=EngineHeartbeat)
            if hb.health == Health.FAILED and hb.in_flight == 0:
                break
        assert "model thread is not running" in hb.health_reason
        refused = await dispatch(nc, worker, _request(inbox, max_tokens=4))
        assert not refused.accepted and refused.code == ErrorCode.ENGINE_FAILED
        assert "model thread is not running" in refused.message
        failed_checks = metrics.registry.get_sample_value("llm_engine_health_checks_total", {"health": "failed"})
        assert failed_checks and failed_checks >= 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
