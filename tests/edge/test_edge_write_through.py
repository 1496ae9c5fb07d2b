"""Token deltas written to the client from the router's callback (``InferenceCall.write_through``).

A delta that arrives while the request's handler waits, with nothing queued before it, goes to
the client's socket at once; everything else takes the pump's way. The edge runs in-process
against a real nats-server with a stand-in engine (``BusEngine``); the router's
``written_through`` counter says which way each delta went, and the bytes on the client's
socket say that the answer is whole and in order either way.
"""

from __future__ import annotations

import asyncio
import json
import socket


from schemas.events import StreamEnd, StreamStart, TokenDelta, Usage, encode
from services.edge.bus.replies import ReplyRouter
from services.edge.state import EDGE
from tests.edge_harness import (  # noqa: F401 - fixtures
    chat_body,
    client,
    edge_config,
    engine,
    parse_json,
    start_edge,
    sse_payloads,
)

CHAT = "/v1/chat/completions"


async def _until(check, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.005)


def _end(req, seq: int, tokens: int) -> StreamEnd:
    return StreamEnd(id=req.id, seq=seq, finish_reason="stop", usage=Usage(prompt_tokens=5, completion_tokens=tokens))


def _contents(payloads: list[str]) -> list[str]:
    """The content of every chunk that has some, in order (role and finish chunks have none)."""
    return [c["choices"][0]["delta"]["content"] for c in map(parse_json, payloads)
            if c.get("choices") and c["choices"][0]["delta"].get("content")]


async def _next_event(resp) -> list[str]:
    """The content of the next SSE event on ``resp`` (empty for one without)."""
    return _contents([(await resp.content.readuntil(b"\n\n")).decode()[len("data: "):-2]])


async def test_deltas_arriving_while_the_handler_waits_reach_the_client_on_arrival(client, engine):
    router = client.app[EDGE].router
    post = asyncio.create_task(client.post(CHAT, json=chat_body(stream=True, cache=False)))
    req = await engine.next_request()
    await engine.send(req, engine.start_event(req), TokenDelta(id=req.id, seq=1, text="t0"))
    resp = await post  # the headers come with the first output
    assert resp.status == 200
    before = router.written_through
    assert await _next_event(resp) == []  # the role chunk
    assert await _next_event(resp) == ["t0"]  # the pump opened the answer with it
    for i in range(1, 6):
        await engine.send(req, TokenDelta(id=req.id, seq=i + 1, text=f"t{i}"))
        # The chunk is on the client's socket before the next delta is even sent.
        assert await _next_event(resp) == [f"t{i}"]
        assert router.written_through == before + i  # and it went the direct way
    await engine.send(req, _end(req, 7, 6))
    rest = sse_payloads((await resp.content.read()).decode())
    assert rest[-1] == "[DONE]"
    assert parse_json(rest[0])["choices"][0]["finish_reason"] == "stop"
    assert router.written_through == before + 5  # the end went the pump's way


async def test_the_router_offers_an_event_to_the_sink_only_while_nothing_is_queued():
    router = ReplyRouter("edge-sink")
    pending = router.register("r1")
    taken = []

    def sink(event) -> bool:
        if type(event) is not TokenDelta:
            return False
        taken.append(event.seq)
        return True

    pending.sink = sink
    router.route("r1", encode(StreamStart(id="r1", worker="w", model="m", prompt_tokens=1)))
    router.route("r1", encode(TokenDelta(id="r1", seq=1, text="a")))  # queued behind the start
    assert taken == [] and pending.queue.qsize() == 2
    pending.queue.get_nowait(), pending.queue.get_nowait()  # the handler read them
    router.route("r1", encode(TokenDelta(id="r1", seq=2, text="b")))
    router.route("r1", encode(TokenDelta(id="r1", seq=3, text="c")))
    assert taken == [2, 3] and pending.queue.qsize() == 0 and router.written_through == 2
    router.route("r1", encode(StreamEnd(id="r1", seq=4, finish_reason="stop",
                                         usage=Usage(prompt_tokens=1, completion_tokens=3))))
    assert taken == [2, 3] and type(pending.queue.get_nowait()) is StreamEnd


async def test_a_sink_that_raises_is_dropped_and_the_request_goes_on_through_its_queue():
    router = ReplyRouter("edge-sink")
    pending, other = router.register("r1"), router.register("r2")
    calls = []

    def broken(event) -> bool:
        calls.append(event.seq)
        raise RuntimeError("a writer bug")

    pending.sink = broken
    router.route("r1", encode(TokenDelta(id="r1", seq=1, text="a")))
    router.route("r1", encode(TokenDelta(id="r1", seq=2, text="b")))
    router.route("r2", encode(TokenDelta(id="r2", seq=1, text="x")))  # the router goes on routing
    assert calls == [1] and pending.sink is None
    assert [pending.queue.get_nowait().text for _ in range(2)] == ["a", "b"]
    assert other.queue.get_nowait().text == "x"


async def _raw_request(port: int, version: str, rcvbuf: int = 0) -> socket.socket:
    """A streaming chat request on a raw socket (``Connection: close``: the edge closes it after the answer)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    body = json.dumps(chat_body(stream=True, cache=False)).encode()
    await loop.sock_sendall(sock, (f"POST {CHAT} HTTP/{version}\r\nHost: edge\r\nContent-Type: application/json\r\n"
                                   f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
    return sock


async def _read_until(sock: socket.socket, got: list[bytes], marker: bytes) -> None:
    """Read into ``got`` until ``marker`` is in what was read."""
    loop = asyncio.get_running_loop()
    while marker not in b"".join(got):
        data = await loop.sock_recv(sock, 1 << 16)
        assert data, f"the connection closed before {marker!r}"
        got.append(data)


async def _read_to_the_end(sock: socket.socket, got: list[bytes]) -> tuple[bytes, bytes]:
    """The response's head and body bytes (``got``: what was read before), read until the edge closed it."""
    loop = asyncio.get_running_loop()
    while data := await loop.sock_recv(sock, 1 << 16):
        got.append(data)
    head, _, body = b"".join(got).partition(b"\r\n\r\n")
    return head, body


def _unchunk(body: bytes) -> bytes:
    """An HTTP/1.1 chunked body decoded; every chunk must be whole and the last one the empty terminator."""
    out, pos = [], 0
    while True:
        line_end = body.index(b"\r\n", pos)
        size = int(body[pos:line_end], 16)
        start = line_end + 2
        assert body[start + size:start + size + 2] == b"\r\n", "a chunk's framing is broken"
        if size == 0:
            assert start + 2 == len(body), "bytes after the last chunk"
            return b"".join(out)
        out.append(body[start:start + size])
        pos = start + size + 2


async def test_a_client_whose_socket_fills_gets_every_delta_in_order_as_the_ways_alternate(nats_server, engine):
    # Small deltas go the direct way; big ones fill the client's socket (it reads nothing until the end), so
    # the direct write declines and the pump takes over, and back whenever the socket drains.
    edge = await start_edge(nats_server, max_stream_buffer=100000, write_timeout=600)
    sock = None
    try:
        router = edge.app[EDGE].router
        sock = await _raw_request(edge.server.port, "1.1", rcvbuf=4096)
        req = await engine.next_request()
        texts = [f"<{i}>" for i in range(4)] + [f"<{i}>" + "x" * 16000 for i in range(4, 204)]
        await engine.send(req, engine.start_event(req), TokenDelta(id=req.id, seq=1, text=texts[0]))
        got: list[bytes] = []
        await _read_until(sock, got, b"<0>")  # the pump opened the answer; it waits for the next event
        for seq in (2, 3, 4):  # each after the handler went back to waiting
            direct = router.written_through
            await engine.send(req, TokenDelta(id=req.id, seq=seq, text=texts[seq - 1]))
            await _until(lambda: router.written_through == direct + 1)
        for start in range(4, len(texts), 8):
            await engine.send(req, *[TokenDelta(id=req.id, seq=i + 1, text=texts[i])
                                     for i in range(start, min(start + 8, len(texts)))])
        await engine.send(req, _end(req, len(texts) + 1, len(texts)))
        head, body = await _read_to_the_end(sock, got)
        assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in head
        payloads = sse_payloads(_unchunk(body).decode())
        assert payloads[-1] == "[DONE]"
        assert _contents(payloads[:-1]) == texts
        assert 3 <= router.written_through < len(texts) - 1  # both ways were taken
    finally:
        if sock is not None:
            sock.close()
        await edge.close()


async def test_an_http_1_0_client_gets_the_direct_deltas_unframed(client, engine):
    router = client.app[EDGE].router
    sock = await _raw_request(client.server.port, "1.0")
    try:
        req = await engine.next_request()
        await engine.send(req, engine.start_event(req), TokenDelta(id=req.id, seq=1, text="a"))
        got: list[bytes] = []
        await _read_until(sock, got, b'"content":"a"')
        for seq, text in ((2, "b"), (3, "c")):
            direct = router.written_through
            await engine.send(req, TokenDelta(id=req.id, seq=seq, text=text))
            await _until(lambda: router.written_through == direct + 1)
        await engine.send(req, _end(req, 4, 3))
        head, body = await _read_to_the_end(sock, got)
        assert head.startswith(b"HTTP/1.0 200") and b"chunked" not in head
        payloads = sse_payloads(body.decode())
        assert payloads[-1] == "[DONE]" and _contents(payloads[:-1]) == ["a", "b", "c"]
    finally:
        sock.close()


async def test_a_delta_after_an_answer_opened_with_nothing_to_send_waits_for_the_headers(client, engine):
    # A completion has no opening chunk, and a first delta may carry no text (half a UTF-8 character):
    # the answer is open but aiohttp still holds its headers, so the next delta must not go out first.
    router = client.app[EDGE].router
    direct = router.written_through
    post = asyncio.create_task(client.post("/v1/completions", json={"model": chat_body()["model"], "prompt": "hi",
                                                                    "stream": True, "cache": False}))
    req = await engine.next_request()
    await engine.send(req, engine.start_event(req), TokenDelta(id=req.id, seq=1, text="", token_ids=[7]))
    await asyncio.sleep(0.1)  # the handler opened the answer and waits
    await engine.send(req, TokenDelta(id=req.id, seq=2, text="b"))
    resp = await post
    assert resp.status == 200
    assert router.written_through == direct  # the pump sent it, headers first
    await engine.send(req, TokenDelta(id=req.id, seq=3, text="c"))
    await _until(lambda: router.written_through == direct + 1)  # then the direct way is open
    await engine.send(req, _end(req, 4, 3))
    payloads = sse_payloads(await resp.text())
    assert payloads[-1] == "[DONE]"
    assert "".join(parse_json(p)["choices"][0]["text"] for p in payloads[:-1]) == "bc"


async def test_no_write_through_hands_every_delta_to_the_handler(nats_server, engine):
    edge = await start_edge(nats_server, write_through=False)
    try:
        router = edge.app[EDGE].router
        post = asyncio.create_task(edge.post(CHAT, json=chat_body(stream=True, cache=False)))
        req = await engine.next_request()
        await engine.send(req, engine.start_event(req), TokenDelta(id=req.id, seq=1, text="a"))
        resp = await post
        assert await _next_event(resp) == []  # the role chunk
        assert await _next_event(resp) == ["a"]
        for seq, text in ((2, "b"), (3, "c")):
            await engine.send(req, TokenDelta(id=req.id, seq=seq, text=text))
            assert await _next_event(resp) == [text]
        await engine.send(req, _end(req, 4, 3))
        assert sse_payloads((await resp.content.read()).decode())[-1] == "[DONE]"
        assert router.written_through == 0
    finally:
        await edge.close()


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALLING = ["Checking. ", "<tool_", 'call>{"name":"get_weather",', '"arguments":{"city":"Par', 'is"}}</tool_call>']


async def _both_ways(client, engine, path: str, body: dict, texts: list[str]) -> tuple[list[str], list[str], int]:
    """The SSE ``data`` payloads of one answer sent delta by delta (each on arrival), then of the same answer
    sent in one batch (through the handler); and how many deltas went the direct way."""
    router = client.app[EDGE].router
    answers = []
    for spaced in (True, False):
        first = b""
        before = router.written_through
        post = asyncio.create_task(client.post(path, json={**body, "stream": True, "cache": False}))
        req = await engine.next_request()
        ends = [_end(req, len(texts) + 1, len(texts))]
        deltas = [TokenDelta(id=req.id, seq=i + 1, text=t) for i, t in enumerate(texts)]
        if spaced:
            await engine.send(req, engine.start_event(req), deltas[0])
            resp = await post
            first = await resp.content.readuntil(b"\n\n")  # the answer is open: the handler waits
            for delta in deltas[1:]:
                direct = router.written_through
                await engine.send(req, delta)
                await _until(lambda: router.written_through == direct + 1)
            await engine.send(req, *ends)
            written = router.written_through - before
        else:
            await engine.send(req, engine.start_event(req), *deltas, *ends)
            resp = await post
        assert resp.status == 200
        text = (first + await resp.content.read()).decode()
        answers.append([line.removeprefix("data: ") for line in text.split("\n") if line.startswith("data: ")])
    return answers[0], answers[1], written


def _shape(payloads: list[str]) -> list:
    """What a client reads from each payload, without the ids and times that differ between two requests."""
    out = []
    for raw in payloads:
        if raw == "[DONE]":
            out.append(raw)
            continue
        event = parse_json(raw)
        if "choices" in event:  # chat
            for choice in event["choices"]:
                for call in choice["delta"].get("tool_calls", []):
                    call.pop("id", None)  # a call id is made per request
            out.append([(c.get("delta"), c.get("finish_reason")) for c in event["choices"]])
        else:  # the Responses API
            out.append((event["type"], event["sequence_number"], event.get("delta"), event.get("arguments"),
                        event.get("text")))
    return out


async def test_a_chat_answer_calling_a_tool_is_the_same_either_way(client, engine):
    spaced, batched, written = await _both_ways(client, engine, CHAT, chat_body(tools=[WEATHER_TOOL]), CALLING)
    assert written == len(CALLING) - 1  # including the deltas the call's parser held back
    assert _shape(spaced) == _shape(batched)
    assert any("tool_calls" in parse_json(p)["choices"][0]["delta"] for p in spaced[:-1] if parse_json(p)["choices"])


async def test_a_responses_stream_is_the_same_either_way_with_and_without_tools(client, engine):
    spaced, batched, written = await _both_ways(client, engine, "/v1/responses",
                                                {"model": chat_body()["model"], "input": "hi"}, ["a", "b", "c"])
    assert written == 2
    assert _shape(spaced) == _shape(batched)
    assert [s[2] for s in _shape(spaced) if s[0] == "response.output_text.delta"] == ["a", "b", "c"]
    assert [s[1] for s in _shape(spaced)] == list(range(len(spaced)))  # sequence numbers unbroken

    spaced, batched, written = await _both_ways(client, engine, "/v1/responses",
                                                {"model": chat_body()["model"], "input": "hi",
                                                 "tools": [{"type": "function", **WEATHER_TOOL["function"]}]},
                                                CALLING)
    assert written == len(CALLING) - 1
    assert _shape(spaced) == _shape(batched)
    assert "response.function_call_arguments.done" in [s[0] for s in _shape(spaced)]
