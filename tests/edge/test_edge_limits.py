"""Hostile or oversized input at the HTTP boundary, and CORS for browser clients."""

from __future__ import annotations

import asyncio

import msgspec
from aiohttp.test_utils import TestClient, TestServer

from services.edge import create_app
from services.edge.http.json_depth import json_depth
from tests.edge_harness import (  # noqa: F401 - fixtures
    MODEL,
    assert_error,
    chat_body,
    client,
    edge_config,
    engine,
    wait_until_served,
)

CHAT = "/v1/chat/completions"
ORIGIN = "https://app.example"


def test_json_depth_ignores_brackets_in_strings():
    assert json_depth(b'{"a": [1, {"b": "[[[[\\\\"}]}') == 3
    assert json_depth(b'{"s": "he said \\"[[\\" ok", "t": [[1]]}') == 3
    assert json_depth(b'"plain"') == 0


async def test_bodies_over_the_size_limit_are_413_openai_errors(client):
    for path in (CHAT, "/api/v1/inference", "/v1/cluster/strategy"):
        resp = await client.post(path, data=b"x" * (2 << 20), headers={"Content-Type": "application/json"})
        assert resp.status == 413, path
        body = await resp.json()
        assert_error(body, "request_too_large")
        assert "1048576" in body["error"]["message"]


async def test_too_deep_json_is_400_before_decoding(client, engine):
    deep = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "metadata": {}}
    node = deep["metadata"]
    for _ in range(70):
        node["x"] = {}
        node = node["x"]
    resp = await client.post(CHAT, data=msgspec.json.encode(deep), headers={"Content-Type": "application/json"})
    assert resp.status == 400
    body = await resp.json()
    assert_error(body, "invalid_request")
    assert "at most 64" in body["error"]["message"]
    resp = await client.post("/api/v1/inference", data=b"[" * 50_000 + b"]" * 50_000)
    assert resp.status == 400
    # A body just under the limit is served normally, and brackets inside strings do not count.
    post = asyncio.create_task(client.post(CHAT, json=chat_body(messages=[{"role": "user", "content": "[{" * 500}])))
    await engine.serve_one(["ok"])
    assert (await post).status == 200


async def test_no_cors_headers_by_default(client):
    resp = await client.get("/healthz", headers={"Origin": ORIGIN})
    assert "Access-Control-Allow-Origin" not in resp.headers
    resp = await client.options(CHAT, headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert resp.status == 405 and "Access-Control-Allow-Origin" not in resp.headers


async def test_cors_preflight_and_headers_for_configured_origins(nc, edge_config, engine):
    config = msgspec.structs.replace(edge_config, cors_origins=[ORIGIN], rate_rpm=100)
    async with TestClient(TestServer(create_app(config))) as c:
        await wait_until_served(c)
        resp = await c.options(CHAT, headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                                              "Access-Control-Request-Headers": "authorization, content-type"})
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert "POST" in resp.headers["Access-Control-Allow-Methods"]
        allowed = {h.strip() for h in resp.headers["Access-Control-Allow-Headers"].split(",")}
        assert {"authorization", "content-type"} <= allowed
        # An origin not configured gets nothing.
        other = await c.options(CHAT, headers={"Origin": "https://evil.example",
                                               "Access-Control-Request-Method": "POST"})
        assert "Access-Control-Allow-Origin" not in other.headers
        # Actual responses (success, error, stream) carry the origin and expose the rate-limit headers.
        post = asyncio.create_task(c.post(CHAT, json=chat_body(), headers={"Origin": ORIGIN}))
        await engine.serve_one(["hi"])
        resp = await post
        assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == ORIGIN
        exposed = resp.headers["Access-Control-Expose-Headers"]
        assert "Retry-After" in exposed and "x-ratelimit-remaining-requests" in exposed
        assert resp.headers["x-ratelimit-limit-requests"] == "100"
        err = await c.post(CHAT, json=chat_body(model="ghost"), headers={"Origin": ORIGIN})
        assert err.status == 404 and err.headers["Access-Control-Allow-Origin"] == ORIGIN
        post = asyncio.create_task(c.post(CHAT, json=chat_body(stream=True), headers={"Origin": ORIGIN}))
        await engine.serve_one(["s"])
        resp = await post
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
