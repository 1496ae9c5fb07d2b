"""Per-caller rate limits counted on the bus: shared by every edge replica, reported in OpenAI's headers."""

from __future__ import annotations

import asyncio
import json
import time

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from schemas import names
from schemas.events import TokenDelta
from services.edge import create_app
from services.common import rate_window
from services.edge.auth.rate_limit import CounterStore, StreamLeases
from services.common.rate_window import RateLimits, RateUsage
from tests.auth_support import bearer, hs256
from tests.support import frozen_minute
from tests.edge_harness import (  # noqa: F401 - fixtures
    MODEL,
    assert_error,
    chat_body,
    edge_config,
    engine,
    wait_until_served,
)

CHAT = "/v1/chat/completions"


@pytest.fixture
def limited_config(edge_config, tmp_path):
    """Edge config with JWT auth (so callers are told apart by ``sub``)."""
    secret = tmp_path / "jwt.secret"
    secret.write_bytes(b"a-shared-secret-of-at-least-32-bytes!!\n")

    def make(**limits):
        return msgspec.structs.replace(edge_config, auth="jwt", jwt_secret_file=str(secret), **limits)

    return make


def _as(sub: str) -> dict[str, str]:
    return bearer(hs256(sub=sub, aud=None, iss=None))


async def _two_edges(config, rate_clock=time.time):
    registries = (CollectorRegistry(), CollectorRegistry())
    clients = [TestClient(TestServer(create_app(config, registry=r, rate_clock=rate_clock))) for r in registries]
    for c in clients:
        await c.start_server()
        await wait_until_served(c)
    return clients, registries


async def _served(client, engine, body: dict, sub: str, texts=("ok",)):
    post = asyncio.create_task(client.post(CHAT, json=body, headers=_as(sub)))
    await engine.serve_one(list(texts))
    return await post


def test_rate_window_arithmetic():
    limits = RateLimits(rpm=3, tpm=100, streams=1)
    assert rate_window.verdict(limits, RateUsage(requests=3, tokens=99), stream=False) is None
    assert rate_window.verdict(limits, RateUsage(requests=4), stream=False) == "requests"
    assert rate_window.verdict(limits, RateUsage(requests=1, tokens=100), stream=False) == "tokens"
    assert rate_window.verdict(limits, RateUsage(requests=1, streams=2), stream=False) is None
    assert rate_window.verdict(limits, RateUsage(requests=1, streams=2), stream=True) == "streams"
    assert limits.overridden(10, None, 0) == RateLimits(rpm=10, tpm=100, streams=0)
    hdrs = rate_window.headers(limits, RateUsage(requests=2, tokens=30), reset=75.2)
    assert hdrs["x-ratelimit-remaining-requests"] == "1" and hdrs["x-ratelimit-reset-requests"] == "1m16s"
    assert hdrs["x-ratelimit-remaining-tokens"] == "70" and hdrs["x-ratelimit-reset-tokens"] == "1m16s"
    assert rate_window.lease_epochs(29.0, 30, 5) == [0, 1] and rate_window.lease_epochs(10.0, 30, 5) == [0]
    assert rate_window.seconds_to_renewal(10.0, 30, 5) == 15.0 and rate_window.seconds_to_renewal(26.0, 30, 5) == 29.0


async def test_requests_per_minute_are_shared_across_two_edges(nc, engine, limited_config):
    (a, b), (reg_a, _) = await _two_edges(limited_config(rate_rpm=4), frozen_minute())
    try:
        remaining = []
        for client in (a, b, a, b):
            resp = await _served(client, engine, chat_body(), "alice")
            assert resp.status == 200
            assert resp.headers["x-ratelimit-limit-requests"] == "4"
            remaining.append(int(resp.headers["x-ratelimit-remaining-requests"]))
        assert remaining == [3, 2, 1, 0]
        for client in (a, b):
            resp = await client.post(CHAT, json=chat_body(), headers=_as("alice"))
            assert resp.status == 429
            body = await resp.json()
            assert_error(body, "rate_limit_exceeded")
            assert body["error"]["type"] == "rate_limit_error" and "4 requests per minute" in body["error"]["message"]
            assert 1 <= int(resp.headers["Retry-After"]) <= 60
            assert resp.headers["x-ratelimit-remaining-requests"] == "0"
            assert resp.headers["x-ratelimit-reset-requests"].endswith("s")
        # Another caller has a budget of its own.
        assert (await _served(b, engine, chat_body(), "bob")).status == 200
        assert reg_a.get_sample_value("llm_edge_rate_limited_total", {"reason": "requests"}) == 1
    finally:
        for c in (a, b):
            await c.close()


async def test_tokens_per_minute_refuse_once_spent(nc, engine, limited_config):
    (a, b), _ = await _two_edges(limited_config(rate_tpm=12), frozen_minute())
    try:
        first = await _served(a, engine, chat_body(), "carol", texts=("x", "y", "z"))  # 5 prompt + 3 = 8 tokens
        assert first.status == 200 and first.headers["x-ratelimit-remaining-tokens"] == "12"
        second = await _served(b, engine, chat_body(stream=True), "carol", texts=("x",))  # 8 + 6 = 14 tokens
        assert second.status == 200 and second.headers["x-ratelimit-remaining-tokens"] == "4"
        await second.read()
        third = await a.post("/api/v1/inference", json={"modelId": MODEL, "prompt": "p"}, headers=_as("carol"))
        assert third.status == 429
        assert "12 tokens per minute" in (await third.json())["error"]["message"]
        assert third.headers["x-ratelimit-remaining-tokens"] == "0" and int(third.headers["Retry-After"]) >= 1
    finally:
        for c in (a, b):
            await c.close()


async def test_concurrent_streams_are_limited_across_edges(nc, engine, limited_config):
    (a, b), (_, reg_b) = await _two_edges(limited_config(rate_streams=1, retry_after=2))
    try:
        held = asyncio.create_task(a.post(CHAT, json=chat_body(stream=True), headers=_as("dave")))
        req = await engine.next_request()
        await engine.send(req, engine.start_event(req))
        await engine.send(req, TokenDelta(id=req.id, seq=1, text="first"))
        stream = await held  # headers are out: the stream is running
        refused = await b.post(CHAT, json=chat_body(stream=True), headers=_as("dave"))
        assert refused.status == 429 and refused.headers["Retry-After"] == "2"
        assert "1 concurrent streams" in (await refused.json())["error"]["message"]
        async with b.ws_connect("/api/v1/inference/ws", headers=_as("dave")) as ws:
            await ws.send_json({"id": "w", "modelId": MODEL, "prompt": "x"})
            frame = json.loads((await ws.receive(timeout=5)).data)
            assert frame["id"] == "w" and frame["error"]["code"] == "rate_limit_exceeded"
        # A request that is not streamed is not a stream.
        assert (await _served(b, engine, chat_body(), "dave")).status == 200
        await engine.answer(req, [])
        await stream.read()
        assert (await _served(b, engine, chat_body(stream=True), "dave")).status == 200
        assert reg_b.get_sample_value("llm_edge_rate_limited_total", {"reason": "streams"}) == 2
    finally:
        for c in (a, b):
            await c.close()


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_stream_leases_of_a_crashed_edge_expire_and_running_ones_renew(js):
    counters = CounterStore(js, timeout=2)
    clock = _Clock(1_000_000 * 30 + 1.0)  # early in an epoch
    crashed = StreamLeases(counters, clock=clock)
    alive = StreamLeases(counters, clock=clock)
    await crashed.acquire("erin")
    lease, total = await alive.acquire("erin")
    assert total == 2
    clock.now += 25.0  # the renewal point of this epoch: only the live edge renews
    await alive.renew()
    clock.now += 5.0  # next epoch: the crashed edge's stream is no longer counted
    _, total = await alive.acquire("erin")
    assert total == 2  # the renewed stream + this one
    await alive.release(lease)
    epoch = int(clock.now // rate_window.LEASE_EPOCH_SECONDS)
    assert await counters.total(names.rate_counter("erin", "streams", epoch)) == 1
