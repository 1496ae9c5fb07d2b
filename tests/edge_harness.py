"""Harness for the edge tests — no tests in here.

``BusEngine`` is a test double that plays the scheduler and one engine on the real bus: it
heart-beats, pulls the requests the edge published from ``LLM_INFER`` and publishes stream
events to their ``reply_to``. The fixtures run the edge app in-process on aiohttp's
TestServer against the real nats-server of ``tests/conftest.py``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from schemas import names
from schemas.events import StreamEnd, StreamError, StreamStart, TokenDelta, Usage, encode
from schemas.heartbeat import EngineHeartbeat, ServedModel
from schemas.inference import CancelRequest, InferenceRequest
from services.common import bus
from services.common.lifecycle import cancel_and_wait
from services.edge import EdgeConfig, create_app

MODEL = "test-org/test-model"
ALIAS = "test-alias"


class BusEngine:
    """Scheduler + engine stand-in: heartbeats, pulls requests, answers with stream events."""

    def __init__(self, nc, js, *, worker: str | None = None, models: list[ServedModel] | None = None,
                 interval: float = 0.1, draining: bool = False) -> None:
        self.nc, self.js = nc, js
        self.worker = worker or f"w-{uuid.uuid4().hex[:8]}"
        self.models = models if models is not None else [ServedModel(id=MODEL, aliases=[ALIAS])]
        self.interval = interval
        self.draining = draining
        self.health, self.health_reason = "ok", ""  # what its heartbeats say its health checks found
        self.seq = 0
        self.started = time.time()
        self._task: asyncio.Task | None = None
        self._subs: dict[str, object] = {}

    def heartbeat(self) -> EngineHeartbeat:
        """The status this engine reports now."""
        self.seq += 1
        return EngineHeartbeat(worker=self.worker, engine="fake", device="cpu", models=self.models, slots=4,
                               in_flight=0, seq=self.seq, ts=time.time(), interval=self.interval,
                               draining=self.draining, started=self.started, health=self.health,
                               health_reason=self.health_reason)

    async def beat(self) -> None:
        """Publish one heartbeat."""
        await self.nc.publish(names.worker_status(self.worker), encode(self.heartbeat()))
        await bus.flush(self.nc)

    async def _beat_forever(self) -> None:
        while True:
            await self.beat()
            await asyncio.sleep(self.interval)

    async def start(self) -> BusEngine:
        """Heart-beat until ``stop_heartbeats``."""
        await self.beat()
        self._task = asyncio.create_task(self._beat_forever())
        return self

    async def stop_heartbeats(self) -> None:
        """Go silent, as a crashed engine does."""
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    async def next_request(self, lane: str = "normal", timeout: float = 5.0) -> InferenceRequest:
        """Pull (and ack) the next request the edge published to ``lane``."""
        sub = self._subs.get(lane)
        if sub is None:
            sub = await self.js.pull_subscribe_bind(names.scheduler_durable(lane), names.INFER_STREAM)
            self._subs[lane] = sub
        msgs = await sub.fetch(1, timeout=timeout)
        await msgs[0].ack()
        return msgspec.json.decode(msgs[0].data, type=InferenceRequest)

    async def send(self, req: InferenceRequest, *events) -> None:
        """Publish events to the request's reply subject."""
        for event in events:
            await self.nc.publish(req.reply_to, encode(event))
        await bus.flush(self.nc)

    def start_event(self, req: InferenceRequest, prompt_tokens: int = 5) -> StreamStart:
        """The ``StreamStart`` this engine sends when it takes ``req``."""
        return StreamStart(id=req.id, worker=self.worker, model=req.model, prompt_tokens=prompt_tokens)

    async def answer(self, req: InferenceRequest, texts: list[str], *, finish: str = "stop",
                     prompt_tokens: int = 5) -> None:
        """A whole successful stream: start, one delta per text, end with usage."""
        events = [self.start_event(req, prompt_tokens)]
        events += [TokenDelta(id=req.id, seq=i + 1, text=t) for i, t in enumerate(texts)]
        events.append(StreamEnd(id=req.id, seq=len(texts) + 1, finish_reason=finish,
                                usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=len(texts))))
        await self.send(req, *events)

    async def fail(self, req: InferenceRequest, code: str, message: str, seq: int = 0) -> None:
        """End the stream with a typed error."""
        await self.send(req, StreamError(id=req.id, code=code, message=message, seq=seq))

    async def serve_one(self, texts: list[str], lane: str = "normal") -> InferenceRequest:
        """Pull one request and answer it completely."""
        req = await self.next_request(lane)
        await self.answer(req, texts)
        return req


class CancelRecorder:
    """Records every ``CancelRequest`` broadcast on ``llm.v1.infer.cancel``."""

    def __init__(self) -> None:
        self.cancels: list[CancelRequest] = []
        self._event = asyncio.Event()

    async def start(self, nc) -> CancelRecorder:
        """Subscribe."""
        async def on_msg(msg) -> None:
            self.cancels.append(msgspec.json.decode(msg.data, type=CancelRequest))
            self._event.set()

        await nc.subscribe(names.INFER_CANCEL, cb=on_msg)
        await bus.flush(nc)
        return self

    async def wait_for(self, request_id: str, timeout: float = 5.0) -> CancelRequest:
        """The cancel of ``request_id``, waiting up to ``timeout``."""
        async with asyncio.timeout(timeout):
            while True:
                for c in self.cancels:
                    if c.id == request_id:
                        return c
                self._event.clear()
                await self._event.wait()


def sse_payloads(text: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order (every event must be ``data: ...\\n\\n``)."""
    assert text.endswith("\n\n"), text[-50:]
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") for e in events), events
    return [e[len("data: "):] for e in events]


def chat_body(**extra) -> dict:
    """A valid chat request for the test model."""
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}


async def wait_until_served(client: TestClient, model: str = MODEL, timeout: float = 5.0) -> None:
    """Wait until the edge's worker table lists ``model`` (heartbeats are asynchronous)."""
    async with asyncio.timeout(timeout):
        while True:
            resp = await client.get("/healthz")
            if model in (await resp.json())["models"]:
                return
            await asyncio.sleep(0.02)


async def start_edge(nats_server, **fields) -> TestClient:
    """An edge in-process on its own config (no prompt cache, a 60 s request timeout, ``fields`` over
    that), started and serving ``MODEL``; close it when done."""
    fields = {"liveness_interval": 0.1, "worker_lost_grace": 5, "request_timeout": 60, "cache_enabled": False,
              **fields}
    config = EdgeConfig(nats_url=nats_server.url, **fields)
    client = TestClient(TestServer(create_app(config)))
    await client.start_server()
    await wait_until_served(client)
    return client


def assert_error(body: dict, code: str, param: str | None = "__any__") -> None:
    """``body`` is an OpenAI error body with ``code`` (and ``param`` when given)."""
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"], err
    if param != "__any__":
        assert err["param"] == param, err


def parse_json(raw: str) -> dict:
    """``json.loads`` with the raw text in the failure message."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:  # pragma: no cover - shows the bad payload
        pytest.fail(f"not JSON: {raw!r}")


@pytest.fixture
def edge_config(nats_server) -> EdgeConfig:
    """Edge config with fast liveness checks, for tests."""
    return EdgeConfig(nats_url=nats_server.url, liveness_interval=0.1, worker_lost_grace=0.2, request_timeout=10)


@pytest.fixture
async def engine(nc, js):
    """A heart-beating stand-in engine serving ``MODEL``."""
    eng = await BusEngine(nc, js).start()
    try:
        yield eng
    finally:
        await eng.stop_heartbeats()


@pytest.fixture
async def cancels(nc) -> CancelRecorder:
    """Every cancel broadcast during the test."""
    return await CancelRecorder().start(nc)


@pytest.fixture
async def client(nc, edge_config, engine):
    """An HTTP client of the edge running in-process, with ``engine`` already in its worker table."""
    async with TestClient(TestServer(create_app(edge_config))) as c:
        await wait_until_served(c)
        yield c

