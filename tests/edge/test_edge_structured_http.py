"""Structured outputs through the edge over HTTP and WebSocket, the test playing scheduler + engine on a real
nats-server: what the bus carries, and how an engine's refusal comes back."""

from __future__ import annotations

import asyncio
import json

from tests.edge_harness import (  # noqa: F401 - fixtures
    MODEL,
    assert_error,
    cancels,
    chat_body,
    client,
    edge_config,
    engine,
    parse_json,
)

SCHEMA = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "required": ["a"],
          "additionalProperties": False}


async def test_response_format_reaches_the_engine_and_its_refusal_is_a_400(client, engine):
    post = asyncio.create_task(client.post("/v1/chat/completions", json=chat_body(
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}, cache=False,
        logit_bias={"7": -5})))
    req = await engine.next_request()
    assert req.structured.kind == "json_schema" and json.loads(req.structured.json) == SCHEMA
    assert req.sampling.logit_bias == {7: -5.0}
    # Every engine tried said it cannot constrain: the scheduler answers with the engine's refusal.
    await engine.fail(req, "unsupported", "the simulated engine cannot enforce structured outputs")
    resp = await post
    assert resp.status == 400
    assert_error(parse_json(await resp.text()), "unsupported")


async def test_a_bad_schema_is_refused_at_the_edge_before_anything_is_published(client, engine):
    resp = await client.post("/v1/chat/completions", json=chat_body(
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": {"oneOf": [SCHEMA]}}}))
    assert resp.status == 400
    body = parse_json(await resp.text())
    assert_error(body, "unsupported", "response_format.json_schema.schema")
    assert "'oneOf'" in body["error"]["message"]
    resp = await client.post("/v1/chat/completions", json=chat_body(tools=[{"type": "custom"}]))
    assert resp.status == 400
    assert_error(parse_json(await resp.text()), "unsupported", "tools[0].type")


async def test_the_websocket_carries_response_format(client, engine):
    async with client.ws_connect("/api/v1/inference/ws") as ws:
        await ws.send_json({"id": "a", "modelId": MODEL, "prompt": "p", "responseFormat": {"type": "json_object"}})
        req = await engine.next_request()
        assert req.structured.kind == "json_object"
        await engine.send(req, engine.start_event(req))
        await engine.answer(req, ["{", "}"])
        frames = []
        while not frames or not (frames[-1].get("done") or "error" in frames[-1]):
            frames.append(json.loads((await ws.receive(timeout=5)).data))
    assert "".join(f.get("token", "") for f in frames) == "{}" and frames[-1]["finishReason"] == "stop"
