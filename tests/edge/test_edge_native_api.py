"""The native API of the seed documents, through the same bus path as the OpenAI endpoints."""

from __future__ import annotations

import asyncio
import json

from tests.edge_harness import (  # noqa: F401 - fixtures
    ALIAS,
    MODEL,
    assert_error,
    client,
    edge_config,
    engine,
    sse_payloads,
)


async def test_native_inference_json(client, engine):
    post = asyncio.create_task(client.post("/api/v1/inference", json={
        "modelId": ALIAS, "prompt": "Hello", "generation": {"max_new_tokens": 7, "temperature": 0, "top_k": 5}}))
    req = await engine.next_request()
    assert req.model == MODEL and req.prompt == "Hello" and req.messages is None
    assert (req.sampling.max_tokens, req.sampling.temperature, req.sampling.top_k) == (7, 0.0, 5)
    await engine.answer(req, ["Hi", " there"])
    resp = await post
    body = await resp.json()
    assert resp.status == 200
    assert body["requestId"] == req.id and body["modelId"] == MODEL and body["text"] == "Hi there"
    assert body["finishReason"] == "stop" and body["usage"]["totalTokens"] == body["usage"]["promptTokens"] + 2


async def test_native_stream_emits_tokens_then_a_done_event(client, engine):
    post = asyncio.create_task(client.post("/api/v1/inference/stream", json={
        "model_id": MODEL, "messages": [{"role": "user", "content": "hi"}]}))
    req = await engine.next_request()
    assert req.messages[0].content == "hi" and req.stream
    await engine.answer(req, ["a", "b", "c"])
    payloads = sse_payloads(await (await post).text())
    events = [json.loads(p) for p in payloads[:-1]]
    assert [e["token"] for e in events[:-1]] == ["a", "b", "c"]
    assert events[-1]["done"] and events[-1]["finishReason"] == "stop" and payloads[-1] == "[DONE]"


async def test_native_bad_input_is_an_openai_error(client, engine):
    for body, param in (({"prompt": "x"}, "modelId"), ({"modelId": MODEL}, "prompt"),
                        ({"modelId": MODEL, "prompt": "x", "generation": {"max_new_tokens": 0}},
                         "generation.max_new_tokens")):
        resp = await client.post("/api/v1/inference", json=body)
        assert resp.status == 400
        err = await resp.json()
        assert_error(err, "invalid_request")
        assert err["error"]["param"] == param
    resp = await client.post("/api/v1/inference", json={"modelId": "nope", "prompt": "x"})
    assert resp.status == 404


async def test_native_models_and_health(client, engine):
    models = await (await client.get("/api/v1/models")).json()
    assert [m["modelId"] for m in models["models"]] == [MODEL]
    assert ALIAS in models["models"][0]["aliases"] and models["models"][0]["engines"] == 1
    plain = await client.get("/api/v1/health")
    assert plain.status == 200 and "engineDetails" not in await plain.json()
    detail = await (await client.get("/api/v1/health?detail=true")).json()
    assert detail["status"] == "ok" and detail["engineDetails"][0]["models"] == [MODEL]
