"""The edge's gateway metrics on ``/metrics``: time to first token, open streams and rejected
requests by reason, scraped after real requests (counts and labels, never timings)."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from schemas.events import TokenDelta
from services.common.api_key_store import ApiKeyStore
from services.edge import create_app
from tests.edge_harness import (  # noqa: F401 - fixtures
    MODEL,
    chat_body,
    client,
    edge_config,
    engine,
    sse_payloads,
    wait_until_served,
)
from tests.edge_wire import EdgeTestServer, exchange, request
from tests.support import frozen_minute

CHAT = "/v1/chat/completions"
WS = "/api/v1/inference/ws"


async def scrape(client: TestClient) -> dict[tuple[str, frozenset], float]:
    """Every sample on ``/metrics``: (name, labels) -> value."""
    resp = await client.get("/metrics")
    assert resp.status == 200
    samples = {}
    for family in text_string_to_metric_families(await resp.text()):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float | None:
    """One sample's value, or ``None`` when the series does not exist."""
    return samples.get((name, frozenset(labels.items())))


async def eventually(check, timeout: float = 5.0) -> None:
    """Wait until ``await check()`` is true (a handler's ``finally`` runs after the client has its answer)."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.02)


async def test_a_streamed_request_counts_an_open_stream_and_its_time_to_first_token(client, engine):
    post = asyncio.create_task(client.post(CHAT, json=chat_body(stream=True)))
    req = await engine.next_request()
    await engine.send(req, engine.start_event(req), TokenDelta(id=req.id, seq=1, text="first"))
    resp = await post  # the headers (and the first chunk) are out: the stream is open
    samples = await scrape(client)
    assert value(samples, "llm_edge_open_streams", route=CHAT, kind="sse") == 1
    assert value(samples, "llm_edge_time_to_first_token_seconds_count", route=CHAT, kind="sse") == 1
    await engine.answer(req, ["second"])
    assert sse_payloads(await resp.text())[-1] == "[DONE]"

    async def closed() -> bool:
        return value(await scrape(client), "llm_edge_open_streams", route=CHAT, kind="sse") == 0

    await eventually(closed)
    samples = await scrape(client)
    assert value(samples, "llm_edge_requests_total", route=CHAT, status="200") == 1
    assert value(samples, "llm_edge_latency_seconds_count", route=CHAT) == 1
    assert value(samples, "llm_edge_time_to_first_token_seconds_count", route=CHAT, kind="sse") == 1
    # A plain answer's first token is its whole body: counted under kind "json".
    post = asyncio.create_task(client.post(CHAT, json=chat_body()))
    await engine.serve_one(["ok"])
    assert (await post).status == 200
    samples = await scrape(client)
    assert value(samples, "llm_edge_time_to_first_token_seconds_count", route=CHAT, kind="json") == 1
    assert value(samples, "llm_edge_time_to_first_token_seconds_count", route=CHAT, kind="sse") == 1
    # Routes that generate nothing have no time to first token.
    assert not any(name.startswith("llm_edge_time_to_first_token") and ("route", "/v1/models") in labels
                   for name, labels in samples)


async def test_a_websocket_is_an_open_stream_and_each_request_on_it_has_a_first_token(client, engine):
    async with client.ws_connect(WS) as ws:
        samples = await scrape(client)
        assert value(samples, "llm_edge_open_streams", route=WS, kind="websocket") == 1
        for client_id in ("a", "b"):
            await ws.send_json({"id": client_id, "modelId": MODEL, "prompt": "x"})
            await engine.serve_one(["tok"])
            frames = [json.loads((await ws.receive(timeout=5)).data) for _ in range(2)]
            assert frames[-1]["done"] is True
        await ws.send_json({"id": "bad", "modelId": MODEL})  # neither prompt nor messages
        frame = json.loads((await ws.receive(timeout=5)).data)
        assert frame["error"]["code"] == "invalid_request"
        samples = await scrape(client)
        assert value(samples, "llm_edge_time_to_first_token_seconds_count", route=WS, kind="websocket") == 2
        assert value(samples, "llm_edge_rejected_requests_total", reason="bad_request") == 1

    async def closed() -> bool:
        return value(await scrape(client), "llm_edge_open_streams", route=WS, kind="websocket") == 0

    await eventually(closed)


async def test_auth_and_scope_refusals_are_counted_by_reason(nc, js, edge_config, engine):
    store = await ApiKeyStore.bind(js)
    _, training_key = await store.create("trainer", ["training"])
    config = msgspec.structs.replace(edge_config, auth="keys", auth_cache_ttl=0)
    async with TestClient(EdgeTestServer(create_app(config, registry=CollectorRegistry()), config)) as c:
        await wait_until_served(c)
        assert (await c.post(CHAT, json=chat_body())).status == 401
        assert (await c.post(CHAT, json=chat_body(), headers={"x-api-key": "cy-000000000000.nope"})).status == 401
        assert (await c.post(CHAT, json=chat_body(), headers={"x-api-key": training_key})).status == 403
        status, _, _ = await exchange(c.port, request("/v1/models", "X-Big: " + "a" * 9000))
        assert status == 431
        samples = await scrape(c)  # /metrics stays open with auth on
        assert value(samples, "llm_edge_rejected_requests_total", reason="auth") == 2
        assert value(samples, "llm_edge_rejected_requests_total", reason="scope") == 1
        assert value(samples, "llm_edge_rejected_requests_total", reason="headers_too_large") == 1
        assert value(samples, "llm_edge_requests_total", route=CHAT, status="401") == 2
        assert value(samples, "llm_edge_requests_total", route=CHAT, status="403") == 1
        assert value(samples, "llm_edge_requests_total", route="unmatched", status="431") == 1
        assert value(samples, "llm_edge_time_to_first_token_seconds_count", route=CHAT, kind="json") is None


@pytest.mark.parametrize("stream", [False, True])
async def test_rate_limit_and_bad_request_refusals_are_counted(nc, edge_config, engine, stream):
    config = msgspec.structs.replace(edge_config, rate_rpm=1)
    app = create_app(config, registry=CollectorRegistry(), rate_clock=frozen_minute())
    async with TestClient(EdgeTestServer(app, config)) as c:
        await wait_until_served(c)
        post = asyncio.create_task(c.post(CHAT, json=chat_body(stream=stream)))
        await engine.serve_one(["ok"])
        assert (await post).status == 200
        await (await post).read()
        refused = await c.post(CHAT, json=chat_body(stream=stream))
        assert refused.status == 429
        assert (await c.post(CHAT, data=b"{not json")).status == 400
        assert (await c.post(CHAT, data=b"x" * (2 << 20))).status == 413
        samples = await scrape(c)
        assert value(samples, "llm_edge_rejected_requests_total", reason="rate_limit") == 1
        assert value(samples, "llm_edge_rejected_requests_total", reason="bad_request") == 1
        assert value(samples, "llm_edge_rejected_requests_total", reason="body_too_large") == 1
        assert value(samples, "llm_edge_rate_limited_total", reason="requests") == 1
        kind = "sse" if stream else "json"
        assert value(samples, "llm_edge_time_to_first_token_seconds_count", route=CHAT, kind=kind) == 1
