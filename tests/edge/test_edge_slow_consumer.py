"""A client that stops reading its stream is cut, not buffered for: the edge's memory stays bounded.

The edge runs in-process against a real nats-server with a stand-in engine (``BusEngine``); the
stalled client is a raw socket with a tiny receive buffer that never reads, so the edge's writes
to it block once the socket buffers are full. The engine keeps publishing big deltas, as a real
one does, until the edge cancels the request; a normal client streaming at the same time must
get its whole answer.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct


from schemas.errors import ErrorCode
from schemas.events import StreamEnd, StreamError, TokenDelta, Usage, encode
from schemas.inference import InferenceRequest
from services.common import bus
from services.edge.bus.replies import ReplyRouter
from tests.edge_harness import (  # noqa: F401 - fixtures
    BusEngine,
    CancelRecorder,
    cancels,
    chat_body,
    engine,
    parse_json,
    start_edge,
    sse_payloads,
)

CHAT = "/v1/chat/completions"
DELTA = "x" * 16384  # big deltas fill the socket buffers after a few hundred events
BATCH = 8


async def _stalled_client(port: int, **extra) -> socket.socket:
    """Open a streaming chat request on a socket that will never be read (a 4 KiB receive window)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    body = json.dumps(chat_body(stream=True, max_tokens=100000, cache=False, **extra)).encode()
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    await loop.sock_sendall(sock, head + body)
    return sock


async def _stalled_websocket(port: int) -> socket.socket:
    """Open ``/api/v1/inference/ws`` and send one request frame on a socket that will never be read."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    await loop.sock_sendall(sock, (f"GET /api/v1/inference/ws HTTP/1.1\r\nHost: edge\r\nUpgrade: websocket\r\n"
                                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                                   "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    payload = json.dumps({"id": "slow", "modelId": chat_body()["model"], "prompt": "hi", "maxTokens": 100000,
                          "cache": False}).encode()
    mask = os.urandom(4)
    head = bytes([0x81]) + (bytes([0x80 | len(payload)]) if len(payload) < 126
                            else bytes([0x80 | 126]) + struct.pack("!H", len(payload)))
    await loop.sock_sendall(sock, head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    return sock


async def _read_to_the_end(sock: socket.socket) -> bytes:
    """Everything the edge sent, until it closed the connection."""
    loop, got = asyncio.get_running_loop(), []
    while True:
        try:
            data = await loop.sock_recv(sock, 1 << 16)
        except ConnectionResetError:  # the edge aborted the connection
            break
        if not data:
            break
        got.append(data)
    return b"".join(got)


async def _flood(engine: BusEngine, req: InferenceRequest, cancels: CancelRecorder, most: int) -> int:
    """Publish big deltas for ``req`` until the edge cancels it, at most ``most``; how many went out."""
    await engine.send(req, engine.start_event(req))
    sent = 0
    while sent < most and not any(c.id == req.id for c in cancels.cancels):
        await engine.send(req, *[TokenDelta(id=req.id, seq=sent + i + 1, text=DELTA) for i in range(BATCH)])
        sent += BATCH
    return sent


async def _stall_one_while_another_streams(nats_server, engine, cancels, most: int, **limits) -> str:
    """A stalled and a normal client at once; the normal one's answer must be whole. Returns /metrics."""
    client = await start_edge(nats_server, liveness_interval=0.05, **limits)
    sock = None
    try:
        sock = await _stalled_client(client.server.port)
        slow = await engine.next_request()
        post = asyncio.create_task(client.post(CHAT, json=chat_body(stream=True, cache=False)))
        normal = await engine.next_request()
        await engine.send(normal, engine.start_event(normal), TokenDelta(id=normal.id, seq=1, text="first "))

        await _flood(engine, slow, cancels, most)
        assert (await cancels.wait_for(slow.id, timeout=30)).reason == "slow_consumer"
        assert not any(c.id == normal.id for c in cancels.cancels)
        received = await _read_to_the_end(sock)  # the stalled stream ended: the connection was closed
        assert received.startswith(b"HTTP/1.1 200")
        assert b"[DONE]" not in received

        await engine.send(normal, TokenDelta(id=normal.id, seq=2, text="second"),
                          StreamEnd(id=normal.id, seq=3, finish_reason="stop",
                                    usage=Usage(prompt_tokens=5, completion_tokens=2)))
        resp = await post
        assert resp.status == 200
        payloads = sse_payloads(await resp.text())
        assert payloads[-1] == "[DONE]"
        chunks = [parse_json(p) for p in payloads[:-1]]
        assert not any("error" in c for c in chunks)
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "first second"
        return await (await client.get("/metrics")).text()
    finally:
        if sock is not None:
            sock.close()
        await client.close()


async def test_a_client_that_stops_reading_is_cut_at_the_buffer_limit(nats_server, engine, cancels):
    # The stall timeout is far away: only the per-request buffer can cut it.
    metrics = await _stall_one_while_another_streams(nats_server, engine, cancels, most=2000,
                                                     max_stream_buffer=16, write_timeout=600)
    assert "llm_edge_slow_consumers_total 1.0" in metrics


async def test_a_write_that_stays_blocked_is_cut_at_the_write_timeout(nats_server, engine, cancels):
    # Fewer events than the buffer limit, but far more bytes than the socket buffers hold.
    metrics = await _stall_one_while_another_streams(nats_server, engine, cancels, most=2000,
                                                     max_stream_buffer=100000, write_timeout=0.2)
    assert "llm_edge_slow_consumers_total 1.0" in metrics


async def test_an_n_choice_answer_whose_client_stops_reading_is_cut_in_every_choice(nats_server, engine, cancels):
    client = await start_edge(nats_server, liveness_interval=0.05, max_stream_buffer=16, write_timeout=600)
    sock = None
    try:
        sock = await _stalled_client(client.server.port, n=2)
        first, second = await engine.next_request(), await engine.next_request()
        await engine.send(second, engine.start_event(second))
        await _flood(engine, first, cancels, most=2000)  # one choice floods, the other is quiet
        assert (await cancels.wait_for(first.id, timeout=30)).reason == "slow_consumer"
        assert (await cancels.wait_for(second.id, timeout=30)).reason == "slow_consumer"
        assert (await _read_to_the_end(sock)).startswith(b"HTTP/1.1 200")
        metrics = await (await client.get("/metrics")).text()
        assert "llm_edge_slow_consumers_total 2.0" in metrics  # one per choice: each is a request on the bus
    finally:
        if sock is not None:
            sock.close()
        await client.close()


async def test_a_websocket_that_stops_reading_is_cut_and_closed(nats_server, engine, cancels):
    client = await start_edge(nats_server, liveness_interval=0.05, max_stream_buffer=16, write_timeout=600)
    sock = None
    try:
        sock = await _stalled_websocket(client.server.port)
        slow = await engine.next_request()
        await _flood(engine, slow, cancels, most=2000)
        assert (await cancels.wait_for(slow.id, timeout=30)).reason == "slow_consumer"
        assert (await _read_to_the_end(sock)).startswith(b"HTTP/1.1 101")  # the socket was closed
        assert "llm_edge_slow_consumers_total 1.0" in await (await client.get("/metrics")).text()
    finally:
        if sock is not None:
            sock.close()
        await client.close()


async def test_the_router_drops_a_slow_requests_events_and_ends_it_with_slow_consumer(nc):
    cut = []
    router = ReplyRouter("edge-slow", max_buffer=4, on_slow_consumer=lambda: cut.append(1))
    await router.start(nc)
    try:
        pending, other = router.register("r1"), router.register("r2")
        for seq in range(1, 11):  # nobody reads r1's queue
            await nc.publish(router.reply_to("r1"), encode(TokenDelta(id="r1", seq=seq, text="t")))
        await nc.publish(router.reply_to("r2"), encode(TokenDelta(id="r2", seq=1, text="t")))
        await bus.flush(nc)
        async with asyncio.timeout(5):
            event = await other.queue.get()  # the other request is not held up
        assert event.id == "r2"
        assert pending.queue.qsize() == 1  # the four buffered events were dropped with the cut
        error = pending.queue.get_nowait()
        assert type(error) is StreamError and error.code == ErrorCode.SLOW_CONSUMER
        assert pending.abandon_reason == "slow_consumer"  # InferenceCall owes the bus a cancel
        assert cut == [1]  # counted once, although later events kept arriving
    finally:
        await router.stop()
