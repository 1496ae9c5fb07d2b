"""Tool calling on the native API (``tools`` / ``toolChoice``, answers with ``toolCalls``) and the legacy
``functions`` form over HTTP, through the edge and the bus with the simulated engine."""

from __future__ import annotations

import asyncio
import json

from aiohttp import WSMsgType

from tests.edge_harness import (  # noqa: F401 - fixtures
    MODEL,
    assert_error,
    client,
    edge_config,
    engine,
    sse_payloads,
)

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
           "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]
# The answer as the engine streams it: text, then a call split across deltas.
PIECES = ["Sure. ", '<tool_call>{"name":"get_weather",', '"arguments":{"city":"Pa', 'ris"}}</tool_call>']
ARGUMENTS = '{"city":"Paris"}'


async def test_native_json_answer_carries_tool_calls(client, engine):
    post = asyncio.create_task(client.post("/api/v1/inference", json={
        "modelId": MODEL, "messages": ASK, "tools": TOOLS, "toolChoice": "required", "parallelToolCalls": False}))
    req = await engine.next_request()
    assert req.structured.kind == "grammar" and "head[lazy]" not in req.structured.grammar
    assert req.messages[0].role == "system" and "get_weather" in req.messages[0].content
    await engine.answer(req, PIECES)
    body = await (await post).json()
    assert body["finishReason"] == "tool_calls" and body["text"] == "Sure. "
    [call] = body["toolCalls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": ARGUMENTS}


async def test_native_stream_sends_tool_call_events_then_done(client, engine):
    post = asyncio.create_task(client.post("/api/v1/inference/stream", json={
        "modelId": MODEL, "messages": ASK, "tools": TOOLS}))
    req = await engine.next_request()
    await engine.answer(req, PIECES)
    events = [json.loads(p) for p in sse_payloads(await (await post).text())[:-1]]
    assert "".join(e.get("token", "") for e in events) == "Sure. "
    parts = [part for e in events for part in e.get("toolCalls", [])]
    assert parts[0]["function"] == {"name": "get_weather", "arguments": ""} and parts[0]["index"] == 0
    assert "".join(p["function"]["arguments"] for p in parts) == ARGUMENTS
    assert events[-1]["done"] and events[-1]["finishReason"] == "tool_calls"


async def test_native_websocket_sends_one_frame_per_tool_call_event(client, engine):
    async with client.ws_connect("/api/v1/inference/ws") as ws:
        await ws.send_json({"id": "t", "modelId": MODEL, "messages": ASK, "tools": TOOLS})
        req = await engine.next_request()
        await engine.answer(req, PIECES)
        frames = []
        while not frames or not frames[-1].get("done"):
            msg = await ws.receive(timeout=5)
            assert msg.type is WSMsgType.TEXT, msg
            frames.append(json.loads(msg.data))
    assert all(f["id"] == "t" for f in frames)
    parts = [part for f in frames for part in f.get("toolCalls", [])]
    assert parts[0]["function"]["name"] == "get_weather"
    assert "".join(p["function"]["arguments"] for p in parts) == ARGUMENTS
    assert frames[-1]["finishReason"] == "tool_calls"


async def test_native_tool_errors_name_the_native_field(client, engine):
    for body, param in (({"prompt": "x", "tools": TOOLS}, "tools"),
                        ({"messages": ASK, "tools": TOOLS, "toolChoice": "sometimes"}, "toolChoice"),
                        ({"messages": ASK, "tools": TOOLS,
                          "toolChoice": {"type": "function", "function": {"name": "x"}}}, "toolChoice.function.name"),
                        ({"messages": ASK + [{"role": "tool", "tool_call_id": "c9", "content": "?"}], "tools": TOOLS},
                         "messages[1].tool_call_id")):
        resp = await client.post("/api/v1/inference", json={"modelId": MODEL, **body})
        assert resp.status == 400
        err = await resp.json()
        assert_error(err, "invalid_request")
        assert err["error"]["param"] == param


async def test_legacy_functions_answer_with_function_call_over_http(client, engine):
    post = asyncio.create_task(client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": ASK, "functions": [TOOLS[0]["function"]], "stream": True}))
    req = await engine.next_request()
    assert "call{0," not in req.structured.grammar  # legacy calls are never parallel
    await engine.answer(req, PIECES)
    events = [json.loads(p)["choices"][0] for p in sse_payloads(await (await post).text())[:-1]]
    parts = [e["delta"]["function_call"] for e in events if "function_call" in e["delta"]]
    assert parts[0] == {"name": "get_weather", "arguments": ""}
    assert "".join(p["arguments"] for p in parts) == ARGUMENTS
    assert not any("tool_calls" in e["delta"] for e in events)
    assert events[-1]["finish_reason"] == "function_call"
