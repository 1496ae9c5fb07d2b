"""Failures after a request is accepted: engine errors, disconnects, deadlines, dead engines, a full queue."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import msgspec
from aiohttp.test_utils import TestClient, TestServer

from infra import provision
from schemas import names
from schemas.events import TokenDelta
from services.edge import create_app
from services.edge.state import EDGE
from tests.edge_harness import (  # noqa: F401 - fixtures
    MODEL,
    BusEngine,
    assert_error,
    cancels,
    chat_body,
    client,
    edge_config,
    engine,
    parse_json,
    sse_payloads,
    wait_until_served,
)

CHAT = "/v1/chat/completions"


async def test_engine_error_before_output_is_a_json_error_with_mapped_status(client, engine, cancels):
    post = asyncio.create_task(client.post(CHAT, json=chat_body(stream=True)))
    req = await engine.next_request()
    await engine.send(req, engine.start_event(req))
    await engine.fail(req, "context_length_exceeded", "prompt has 9000 tokens, the model takes 8192")
    resp = await post
    assert resp.status == 400
    body = await resp.json()
    assert_error(body, "context_length_exceeded")
    assert "8192" in body["error"]["message"]
    # A marker cancel sent after the answer on the edge's own connection arrives after any cancel the edge
    # sent for the request (one connection's messages keep their order): once it is here, none came.
    await client.app[EDGE].publisher.cancel("marker", "test")
    await cancels.wait_for("marker")
    assert [c.id for c in cancels.cancels] == ["marker"]  # the request ended on the bus: nothing to cancel


async def test_engine_error_mid_stream_is_an_sse_error_event_then_done(client, engine):
    post = asyncio.create_task(client.post(CHAT, json=chat_body(stream=True)))
    req = await engine.next_request()
    await engine.send(req, engine.start_event(req), TokenDelta(id=req.id, seq=1, text="par"))
    await engine.fail(req, "engine_failed", "CUDA error: device-side assert", seq=2)
    resp = await post
    assert resp.status == 200
    payloads = sse_payloads(await resp.text())
    assert payloads[-1] == "[DONE]"
    assert parse_json(payloads[1])["choices"][0]["delta"] == {"content": "par"}
    error = parse_json(payloads[-2])
    assert_error(error, "engine_failed")
    assert error["error"]["type"] == "server_error"


async def test_engine_error_non_stream_maps_status(client, engine):
    post = asyncio.create_task(client.post(CHAT, json=chat_body()))
    req = await engine.next_request()
    await engine.fail(req, "engine_busy", "all slots taken")
    resp = await post
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "1"
    assert_error(await resp.json(), "engine_busy")


async def test_client_disconnect_mid_stream_publishes_cancel(client, engine, cancels):
    resp_task = asyncio.create_task(client.post(CHAT, json=chat_body(stream=True)))
    req = await engine.next_request()
    await engine.send(req, engine.start_event(req), TokenDelta(id=req.id, seq=1, text="a"))
    resp = await resp_task
    await resp.content.readany()
    resp.close()  # the client goes away mid-stream
    cancel = await cancels.wait_for(req.id)
    assert cancel.reason == "client_disconnected"
    assert (await client.get("/healthz")).status == 200


async def test_client_disconnect_while_queued_publishes_cancel(edge_config, nc, engine, cancels):
    async with TestClient(TestServer(create_app(edge_config))) as c:
        await wait_until_served(c)
        async with aiohttp.ClientSession() as session:
            with_timeout = aiohttp.ClientTimeout(total=0.5)
            post = asyncio.create_task(session.post(c.make_url(CHAT), json=chat_body(), timeout=with_timeout))
            req = await engine.next_request()
            try:
                await post
            except TimeoutError:
                pass
        assert (await cancels.wait_for(req.id)).reason == "client_disconnected"


async def test_deadline_answers_504_and_cancels(client, engine, cancels):
    post = asyncio.create_task(client.post(CHAT, json=chat_body(timeout=0.5)))
    req = await engine.next_request()
    assert abs(req.deadline - req.created - 0.5) < 1e-3
    resp = await post  # the engine never answers: only the deadline can end the request
    assert time.time() >= req.deadline  # and it ended it no earlier than that
    assert resp.status == 504
    assert_error(await resp.json(), "timeout")
    assert (await cancels.wait_for(req.id)).reason == "timeout"


async def test_deadline_mid_stream_is_an_sse_error(client, engine, cancels):
    post = asyncio.create_task(client.post(CHAT, json=chat_body(stream=True, timeout=0.5)))
    req = await engine.next_request()
    await engine.send(req, engine.start_event(req), TokenDelta(id=req.id, seq=1, text="slow"))
    payloads = sse_payloads(await (await post).text())
    assert payloads[-1] == "[DONE]"
    assert_error(parse_json(payloads[-2]), "timeout")
    assert (await cancels.wait_for(req.id)).reason == "timeout"


async def test_engine_death_mid_stream_ends_with_worker_lost(client, engine, cancels):
    post = asyncio.create_task(client.post(CHAT, json=chat_body(stream=True)))
    req = await engine.next_request()
    await engine.send(req, engine.start_event(req), TokenDelta(id=req.id, seq=1, text="a"))
    await engine.stop_heartbeats()  # the engine dies; the request has no deadline soon: only the sweep can end it
    payloads = sse_payloads(await (await post).text())
    assert payloads[-1] == "[DONE]"
    assert_error(parse_json(payloads[-2]), "worker_lost")
    assert (await cancels.wait_for(req.id)).reason == "worker_lost"


async def test_engine_death_non_stream_is_502_worker_lost(client, engine):
    post = asyncio.create_task(client.post(CHAT, json=chat_body()))
    req = await engine.next_request()
    await engine.send(req, engine.start_event(req))
    await engine.stop_heartbeats()
    resp = await asyncio.wait_for(post, 3)
    assert resp.status == 502
    assert_error(await resp.json(), "worker_lost")


async def test_full_queue_is_429_with_retry_after(client, js):
    defs = provision.load_definitions()
    defs["streams"][names.INFER_STREAM]["max_msgs"] = 2
    await provision.apply(js, definitions=defs, update=True)
    for _ in range(2):  # nobody consumes: the queue fills up
        await js.publish(names.infer_submit("normal"), b"{}")
    resp = await client.post(CHAT, json=chat_body())
    assert resp.status == 429
    # Nothing drains this queue: the edge says so with the longest Retry-After, not a hopeful 1 s.
    assert resp.headers["Retry-After"] == "60"
    body = await resp.json()
    assert_error(body, "queue_full")
    assert body["error"]["type"] == "rate_limit_error"


async def test_missing_queue_is_503(client, js):
    await js.delete_stream(names.INFER_STREAM)
    resp = await client.post(CHAT, json=chat_body())
    assert resp.status == 503
    assert_error(await resp.json(), "no_worker_available")


async def test_malformed_event_from_engine_fails_the_request(client, engine):
    post = asyncio.create_task(client.post(CHAT, json=chat_body()))
    req = await engine.next_request()
    await engine.nc.publish(req.reply_to, b'{"type": "delta", "seq": "one"}')
    resp = await asyncio.wait_for(post, 3)
    assert resp.status == 500
    assert_error(await resp.json(), "internal_error")


async def test_nats_down_gives_503s_and_shutdown_does_not_hang(nats_server, nc, js, edge_config):
    config = msgspec.structs.replace(edge_config, publish_timeout=0.5)
    async with asyncio.timeout(15), TestClient(TestServer(create_app(config))) as c:
        await BusEngine(nc, js, interval=30).beat()  # the model stays known while the bus is down
        await wait_until_served(c)
        nats_server.stop()
        async with asyncio.timeout(5):
            while (resp := await c.get("/healthz")).status == 200:
                await asyncio.sleep(0.05)
        body = await resp.json()
        assert resp.status == 503 and body["nats"] != "connected" and body["status"] == "unavailable"
        post = await c.post(CHAT, json=chat_body())
        assert post.status == 503
        assert post.headers["Retry-After"] == "1"
        assert_error(await post.json(), "no_worker_available")
