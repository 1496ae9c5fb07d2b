"""The edge in-process over HTTP, with the test playing scheduler + engine on a real nats-server."""

from __future__ import annotations

import asyncio
import time

from aiohttp.test_utils import TestClient, TestServer

from schemas import names
from schemas.events import StreamEnd, TokenDelta, Usage, encode
from schemas.heartbeat import ServedModel
from services.edge import create_app
from tests.edge_harness import (  # noqa: F401 - fixtures
    ALIAS,
    MODEL,
    BusEngine,
    cancels,
    chat_body,
    client,
    edge_config,
    engine,
    parse_json,
    sse_payloads,
    wait_until_served,
)


async def test_chat_non_stream_returns_completion_and_publishes_translated_request(client, engine):
    before = time.time()
    post = asyncio.create_task(client.post("/v1/chat/completions", json=chat_body(
        model=ALIAS, temperature=0.5, max_tokens=7, stop="END", seed=3, top_k=4, timeout=30,
        messages=[{"role": "system", "content": "be brief"},
                  {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])))
    req = await engine.next_request()
    assert req.id.startswith("chatcmpl-") and len(req.id) == len("chatcmpl-") + 32
    assert req.model == MODEL  # the alias was resolved before publishing
    assert req.reply_to.startswith(names.REPLY_PREFIX + ".") and req.reply_to.endswith("." + req.id)
    assert [(m.role, m.content) for m in req.messages] == [("system", "be brief"), ("user", "a\nb")]
    assert (req.sampling.temperature, req.sampling.max_tokens, req.sampling.stop) == (0.5, 7, ["END"])
    assert (req.sampling.seed, req.sampling.top_k, req.prompt) == (3, 4, None)
    assert before + 29 < req.deadline < time.time() + 31 and before <= req.created <= time.time()
    await engine.answer(req, ["Hel", "lo"], prompt_tokens=9)
    resp = await post
    assert resp.status == 200
    body = await resp.json()
    assert body == {
        "id": req.id, "object": "chat.completion", "created": body["created"], "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "logprobs": None,
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
    }
    assert abs(body["created"] - before) <= 2


async def test_chat_stream_is_openai_sse_with_usage_and_done(client, engine):
    post = asyncio.create_task(client.post("/v1/chat/completions", json=chat_body(
        stream=True, stream_options={"include_usage": True})))
    req = await engine.next_request()
    await engine.answer(req, ["Hi", " there"], finish="length", prompt_tokens=4)
    resp = await post
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    payloads = sse_payloads(await resp.text())
    assert payloads[-1] == "[DONE]"
    chunks = [parse_json(p) for p in payloads[:-1]]
    for c in chunks:
        assert (c["id"], c["object"], c["model"]) == (req.id, "chat.completion.chunk", MODEL)
        assert isinstance(c["created"], int)
    assert [c["choices"] for c in chunks] == [
        [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}],
        [{"index": 0, "delta": {"content": "Hi"}, "logprobs": None, "finish_reason": None}],
        [{"index": 0, "delta": {"content": " there"}, "logprobs": None, "finish_reason": None}],
        [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}],
        [],
    ]
    assert [c["usage"] for c in chunks[:-1]] == [None] * 4
    assert chunks[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}


async def test_chat_stream_without_include_usage_has_no_usage_member(client, engine):
    post = asyncio.create_task(client.post("/v1/chat/completions", json=chat_body(stream=True)))
    await engine.serve_one(["x"])
    payloads = sse_payloads(await (await post).text())
    chunks = [parse_json(p) for p in payloads[:-1]]
    assert payloads[-1] == "[DONE]" and len(chunks) == 3
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_stream_flushes_each_token_as_it_arrives(client, engine):
    resp_task = asyncio.create_task(client.post("/v1/chat/completions", json=chat_body(stream=True)))
    req = await engine.next_request()
    await engine.send(req, engine.start_event(req), TokenDelta(id=req.id, seq=1, text="first"))
    resp = await resp_task  # headers arrived although the stream has not ended
    seen = b""
    async with asyncio.timeout(5):
        while b'"first"' not in seen:
            seen += await resp.content.readany()
    assert b"[DONE]" not in seen
    await engine.send(req, StreamEnd(id=req.id, seq=2, finish_reason="stop",
                                     usage=Usage(prompt_tokens=1, completion_tokens=1)))
    rest = (seen + await resp.content.read()).decode()
    assert sse_payloads(rest)[-1] == "[DONE]"


async def test_legacy_completion_non_stream(client, engine):
    post = asyncio.create_task(client.post("/v1/completions", json={"model": MODEL, "prompt": ["Once"]}))
    req = await engine.next_request()
    assert req.id.startswith("cmpl-") and req.prompt == "Once" and req.messages is None
    assert req.sampling.max_tokens == 16  # OpenAI's default for legacy completions
    await engine.answer(req, [" upon", " a time"])
    body = await (await post).json()
    assert body == {
        "id": req.id, "object": "text_completion", "created": body["created"], "model": MODEL,
        "choices": [{"text": " upon a time", "index": 0, "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }


async def test_legacy_completion_stream(client, engine):
    post = asyncio.create_task(client.post("/v1/completions", json={
        "model": MODEL, "prompt": "Once", "stream": True, "stream_options": {"include_usage": True}}))
    req = await engine.serve_one([" upon"])
    payloads = sse_payloads(await (await post).text())
    assert payloads[-1] == "[DONE]"
    chunks = [parse_json(p) for p in payloads[:-1]]
    assert all(c["object"] == "text_completion" and c["id"] == req.id for c in chunks)
    assert [c["choices"] for c in chunks] == [
        [{"text": " upon", "index": 0, "logprobs": None, "finish_reason": None}],
        [{"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}],
        [],
    ]
    assert chunks[-1]["usage"]["total_tokens"] == 6


async def test_priority_routes_to_lanes(client, engine):
    for priority, lane in ((5, "high"), (-2, "low"), (0, "normal")):
        post = asyncio.create_task(client.post("/v1/chat/completions", json=chat_body(priority=priority)))
        req = await engine.next_request(lane)
        assert req.priority == priority
        await engine.answer(req, ["ok"])
        assert (await post).status == 200


async def test_models_list_get_and_health(client, engine, nc, js):
    other = await BusEngine(nc, js, models=[ServedModel(id="other", owned_by="acme")]).start()
    gone = await BusEngine(nc, js, models=[ServedModel(id="leaving")], draining=True).start()
    try:
        await wait_until_served(client, "other")
        body = await (await client.get("/v1/models")).json()
        assert body["object"] == "list"
        assert {m["id"]: m["owned_by"] for m in body["data"]} == {MODEL: "cy-llm", "other": "acme"}
        assert all(m["object"] == "model" and isinstance(m["created"], int) for m in body["data"])
        by_alias = await client.get(f"/v1/models/{ALIAS}")
        assert by_alias.status == 200 and (await by_alias.json())["id"] == MODEL
        assert (await client.get(f"/v1/models/{MODEL}")).status == 200  # ids may contain '/'
        missing = await client.get("/v1/models/leaving")
        assert missing.status == 404 and (await missing.json())["error"]["code"] == "model_not_found"
        health = await client.get("/healthz")
        assert health.status == 200
        h = await health.json()
        assert (h["status"], h["nats"], h["engines"]) == ("ok", "connected", 3)  # draining engines count as live
        assert h["models"] == sorted([MODEL, "other"])  # ... but their models are not offered
    finally:
        await other.stop_heartbeats()
        await gone.stop_heartbeats()


async def test_worker_table_bootstraps_from_kv(nc, js, edge_config):
    silent = BusEngine(nc, js, interval=5.0, models=[ServedModel(id="from-kv")])
    kv = await js.key_value(names.WORKERS_BUCKET)
    await kv.put(silent.worker, encode(silent.heartbeat()))
    async with TestClient(TestServer(create_app(edge_config))) as c:
        body = await (await c.get("/v1/models")).json()
        assert [m["id"] for m in body["data"]] == ["from-kv"]


async def test_empty_worker_bucket_starts_with_no_models(nc, edge_config):
    async with TestClient(TestServer(create_app(edge_config))) as c:
        assert await (await c.get("/v1/models")).json() == {"object": "list", "data": []}
        resp = await c.post("/v1/chat/completions", json=chat_body())
        assert resp.status == 404


async def test_metrics_count_requests_by_route_and_status(client):
    await client.get("/v1/models")
    await client.post("/v1/chat/completions", data=b"{")
    text = await (await client.get("/metrics")).text()
    assert 'llm_edge_requests_total{route="/v1/models",status="200"} 1.0' in text
    assert 'llm_edge_requests_total{route="/v1/chat/completions",status="400"} 1.0' in text
    assert "llm_edge_latency_seconds_bucket" in text
