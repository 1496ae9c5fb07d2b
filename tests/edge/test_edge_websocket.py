"""``/api/v1/inference/ws``: several requests on one socket, cancel by id, bad frames, closing cancels."""

from __future__ import annotations

import asyncio
import json

from aiohttp import WSMsgType

from tests.edge_harness import (  # noqa: F401 - fixtures
    MODEL,
    assert_error,
    cancels,
    client,
    edge_config,
    engine,
)

WS = "/api/v1/inference/ws"


async def _frame(ws, timeout: float = 5.0) -> dict:
    msg = await ws.receive(timeout=timeout)
    assert msg.type is WSMsgType.TEXT, msg
    return json.loads(msg.data)


async def _frames_until_done(ws, ids: set[str]) -> dict[str, list[dict]]:
    """Collect frames by client id until every id in ``ids`` got its terminal frame."""
    out: dict[str, list[dict]] = {}
    open_ids = set(ids)
    while open_ids:
        frame = await _frame(ws)
        out.setdefault(frame["id"], []).append(frame)
        if frame.get("done") or "error" in frame:
            open_ids.discard(frame["id"])
    return out


async def test_two_concurrent_requests_and_a_cancel(client, engine, cancels):
    async with client.ws_connect(WS) as ws:
        await ws.send_json({"id": "a", "modelId": MODEL, "prompt": "one"})
        await ws.send_json({"id": "b", "modelId": MODEL, "messages": [{"role": "user", "content": "two"}]})
        await ws.send_json({"id": "c", "modelId": MODEL, "prompt": "three"})
        reqs = {}
        for _ in range(3):
            req = await engine.next_request()
            reqs[req.prompt or req.messages[0].content] = req
        # Interleave the answers of "a" and "b"; "c" never gets one and is cancelled by the client.
        await engine.send(reqs["one"], engine.start_event(reqs["one"]))
        await engine.send(reqs["two"], engine.start_event(reqs["two"]))
        await engine.answer(reqs["two"], ["x", "y"])
        await engine.answer(reqs["one"], ["1", "2", "3"])
        await ws.send_json({"type": "cancel", "id": "c"})
        frames = await _frames_until_done(ws, {"a", "b", "c"})
    assert [f["token"] for f in frames["a"][:-1]] == ["1", "2", "3"]
    assert [f["token"] for f in frames["b"][:-1]] == ["x", "y"]
    for cid, prompt in (("a", "one"), ("b", "two")):
        last = frames[cid][-1]
        assert last["done"] and last["finishReason"] == "stop" and last["requestId"] == reqs[prompt].id
        assert last["usage"]["completionTokens"] == len(frames[cid]) - 1
    assert len(frames["c"]) == 1
    assert_error({"error": frames["c"][0]["error"]}, "cancelled")
    assert (await cancels.wait_for(reqs["three"].id)).reason == "client_disconnected"


async def test_bad_frames_get_error_frames_and_the_socket_stays_open(client, engine):
    async with client.ws_connect(WS) as ws:
        await ws.send_str("{not json")
        assert_error({"error": (await _frame(ws))["error"]}, "invalid_request", None)
        await ws.send_json({"id": "m", "prompt": "no model"})
        frame = await _frame(ws)
        assert frame["id"] == "m"
        assert_error({"error": frame["error"]}, "invalid_request", "modelId")
        await ws.send_json({"id": "g", "modelId": "ghost", "prompt": "x"})
        assert_error({"error": (await _frame(ws))["error"]}, "model_not_found")
        await ws.send_json({"type": "launch", "id": "t"})
        assert_error({"error": (await _frame(ws))["error"]}, "invalid_request", "type")
        await ws.send_json({"type": "cancel", "id": "nobody"})
        frame = await _frame(ws)
        assert frame["id"] == "nobody" and "no request" in frame["error"]["message"]
        await ws.send_str("[" * 100 + "]" * 100)
        assert "nests 100 levels" in (await _frame(ws))["error"]["message"]
        # Still serving on the same socket.
        await ws.send_json({"id": "ok", "modelId": MODEL, "prompt": "fine"})
        await engine.serve_one(["still", " here"])
        frames = await _frames_until_done(ws, {"ok"})
        assert "".join(f.get("token", "") for f in frames["ok"]) == "still here"


async def test_duplicate_running_id_is_refused(client, engine, cancels):
    async with client.ws_connect(WS) as ws:
        await ws.send_json({"id": "same", "modelId": MODEL, "prompt": "first"})
        req = await engine.next_request()
        await ws.send_json({"id": "same", "modelId": MODEL, "prompt": "second"})
        frame = await _frame(ws)
        assert frame["id"] == "same" and "already running" in frame["error"]["message"]
        await engine.answer(req, ["done"])
        frames = await _frames_until_done(ws, {"same"})
        assert frames["same"][-1]["done"]


async def test_closing_the_socket_cancels_its_running_requests(client, engine, cancels):
    ws = await client.ws_connect(WS)
    await ws.send_json({"id": "1", "modelId": MODEL, "prompt": "a"})
    await ws.send_json({"id": "2", "modelId": MODEL, "prompt": "b"})
    first, second = await engine.next_request(), await engine.next_request()
    await engine.send(first, engine.start_event(first))
    await ws.close()
    for req in (first, second):
        assert (await cancels.wait_for(req.id)).reason == "client_disconnected"
    resp = await client.get("/healthz")
    assert (await resp.json())["in_flight"] == 0


async def test_an_idempotency_key_gives_a_retry_the_first_answer_without_generating_again(client, engine):
    keyed = {"modelId": MODEL, "prompt": "keyed"}
    async with client.ws_connect(WS) as ws:
        await ws.send_json({"id": "first", "idempotencyKey": "order-1", **keyed})
        req = await engine.next_request()
        # A retry while the first runs cannot join its stream: told so at once (as an HTTP stream is: 409).
        await ws.send_json({"id": "early", "idempotency_key": "order-1", **keyed})
        early = await _frame(ws)
        assert early["id"] == "early"
        assert_error({"error": early["error"]}, "conflict")
        await engine.answer(req, ["a", "b"])
        first = (await _frames_until_done(ws, {"first"}))["first"]
        # The key is the native API's: a non-streamed HTTP retry waits for the record and gets the same answer.
        resp = await client.post("/api/v1/inference", json=keyed, headers={"Idempotency-Key": "order-1"})
        by_http = await resp.json()
        assert resp.status == 200 and by_http["requestId"] == req.id and by_http["text"] == "ab", by_http
        await ws.send_json({"id": "retry", "idempotency_key": "order-1", **keyed})
        retry = (await _frames_until_done(ws, {"retry"}))["retry"]
        await ws.send_json({"id": "other", "idempotencyKey": "order-1", "modelId": MODEL, "prompt": "another"})
        other = await _frame(ws)
        assert_error({"error": other["error"]}, "invalid_request", "Idempotency-Key")
        await ws.send_json({"id": "bad", "idempotencyKey": "", **keyed})
        assert_error({"error": (await _frame(ws))["error"]}, "invalid_request", "idempotencyKey")
        await ws.send_json({"id": "plain", "modelId": MODEL, "prompt": "unkeyed"})
        # Nothing was queued for the retries: the next request the engine sees is the unkeyed one.
        assert (await engine.next_request()).prompt == "unkeyed"
    assert [f["token"] for f in first[:-1]] == ["a", "b"]
    assert "".join(f.get("token", "") for f in retry[:-1]) == "ab"
    assert retry[-1]["requestId"] == first[-1]["requestId"] == req.id
    assert retry[-1]["done"] and retry[-1]["finishReason"] == "stop" and retry[-1]["usage"] == first[-1]["usage"]
