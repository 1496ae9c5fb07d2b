"""``/v1/responses`` through the official OpenAI SDK against the edge in-process, a stand-in engine on the bus.

Shapes and flows: the object and the typed stream events the SDK parses, the conversation a
``previous_response_id`` chain rebuilds (what the engine is asked), retrieval, deletion, input
items, refusals naming their field, a mid-stream error, a client that disconnects, and stored
responses seen only by the API key that created them.
"""

from __future__ import annotations

import asyncio
import json

import msgspec
import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer

from schemas import names
from schemas.auth import Scope
from schemas.errors import BusError
from schemas.events import TokenDelta
from services.common.api_key_store import ApiKeyStore
from services.edge import EdgeConfig, create_app
from services.edge.config import parse_args
from services.edge.openai import responses_tools, responses_translate
from services.edge.openai.responses_translate import parse_responses
from tests.auth_support import bearer
from tests.edge_harness import (  # noqa: F401 - fixtures
    MODEL,
    BusEngine,
    assert_error,
    cancels,
    client,
    edge_config,
    engine,
    wait_until_served,
)

STREAM_ORDER = ["response.created", "response.in_progress", "response.output_item.added",
                "response.content_part.added"]
STREAM_END = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


@pytest.fixture
async def sdk(client):
    """An ``AsyncOpenAI`` pointed at the in-process edge."""
    async with openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0,
                                  timeout=10) as c:
        yield c


async def _create(sdk, engine, texts: list[str], **kwargs):
    """``responses.create`` answered by the engine with ``texts``; the response and the request the engine saw."""
    call = asyncio.create_task(sdk.responses.create(model=MODEL, **kwargs))
    req = await engine.serve_one(texts)
    return await call, req


async def test_sdk_create_returns_a_completed_response_with_usage(sdk, engine):
    response, req = await _create(sdk, engine, ["Hello", "!"], input="hi", instructions="Be brief.",
                                  max_output_tokens=7, temperature=0.5, metadata={"team": "a"})
    assert response.object == "response" and response.status == "completed" and response.id.startswith("resp")
    assert response.output_text == "Hello!"
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.content[0].type == "output_text"
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (5, 2, 7)
    assert (response.instructions, response.max_output_tokens, response.temperature, response.metadata) == (
        "Be brief.", 7, 0.5, {"team": "a"})
    assert [(m.role, m.content) for m in req.messages] == [("system", "Be brief."), ("user", "hi")]
    assert (req.sampling.max_tokens, req.sampling.temperature, req.stream) == (7, 0.5, False)


async def test_sdk_stream_sends_the_typed_events_in_order(sdk, engine):
    async def consume():
        stream = await sdk.responses.create(model=MODEL, input="hi", stream=True)
        return [event async for event in stream]

    call = asyncio.create_task(consume())
    await engine.serve_one(["a", "b", "c"])
    events = await call
    types = [e.type for e in events]
    assert types == STREAM_ORDER + ["response.output_text.delta"] * 3 + STREAM_END + ["response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas == "abc" == final.output_text == events[-4].text
    assert events[0].response.status == "in_progress" and final.status == "completed"
    assert final.usage.output_tokens == 3
    # Stored before response.completed went out: retrievable at once.
    assert (await sdk.responses.retrieve(final.id)).output_text == "abc"


async def test_a_cut_answer_is_incomplete_with_its_reason(client, engine):
    post = asyncio.create_task(client.post("/v1/responses", json={"model": MODEL, "input": "hi", "stream": True,
                                                                  "max_output_tokens": 2}))
    req = await engine.next_request()
    await engine.answer(req, ["a", "b"], finish="length")
    events = _events(await (await post).text())
    assert events[-1]["type"] == "response.incomplete"
    final = events[-1]["response"]
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"][0]["status"] == "incomplete"


def _events(text: str) -> list[dict]:
    """The ``data`` of every SSE event, checked against its ``event:`` line."""
    out = []
    for block in text.strip().split("\n\n"):
        event, data = block.split("\n")
        payload = json.loads(data.removeprefix("data: "))
        assert event == f"event: {payload['type']}"
        out.append(payload)
    return out


async def test_previous_response_id_continues_the_conversation(sdk, engine):
    first, _ = await _create(sdk, engine, ["Ann", " here"], input="Who are you?", instructions="Be Ann.")
    second, req = await _create(sdk, engine, ["Still Ann"], input="Again?", previous_response_id=first.id)
    # Instructions are not carried over (OpenAI's rule); the earlier input and output are.
    assert [(m.role, m.content) for m in req.messages] == [
        ("user", "Who are you?"), ("assistant", "Ann here"), ("user", "Again?")]
    assert second.previous_response_id == first.id
    third, req = await _create(sdk, engine, ["ok"], input=[{"role": "user", "content": "Third"}],
                               previous_response_id=second.id)
    assert [m.content for m in req.messages] == ["Who are you?", "Ann here", "Again?", "Still Ann", "Third"]


async def test_retrieve_input_items_and_delete(sdk, engine):
    items = [{"role": "developer", "content": "Answer in French."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"},
                                                             {"type": "input_text", "text": "there"}]}]
    created, req = await _create(sdk, engine, ["Bonjour"], input=items)
    assert [(m.role, m.content) for m in req.messages] == [("developer", "Answer in French."),
                                                            ("user", "Hello\nthere")]
    got = await sdk.responses.retrieve(created.id)
    assert got.id == created.id and got.output_text == "Bonjour" and got.status == "completed"
    listed = await sdk.responses.input_items.list(created.id)
    assert [i.role for i in listed.data] == ["user", "developer"]  # newest first, as OpenAI lists them
    assert [p.text for p in listed.data[0].content] == ["Hello", "there"]
    ascending = await sdk.responses.input_items.list(created.id, order="asc", limit=1)
    assert [i.role for i in ascending.data] == ["developer"] and ascending.has_more
    await sdk.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError) as gone:
        await sdk.responses.retrieve(created.id)
    assert gone.value.code == "not_found"
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.delete(created.id)


async def test_store_false_is_not_retrievable(sdk, engine):
    response, _ = await _create(sdk, engine, ["x"], input="hi", store=False)
    assert response.store is False
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.retrieve(response.id)


async def test_unknown_previous_response_id_is_404_before_anything_runs(sdk):
    with pytest.raises(openai.NotFoundError) as missing:
        await sdk.responses.create(model=MODEL, input="hi", previous_response_id="resp-does-not-exist")
    assert missing.value.code == "not_found" and missing.value.param == "previous_response_id"


@pytest.mark.parametrize(("body", "code", "param"), [
    ({"input": "hi", "frobnicate": 1}, "unsupported", "frobnicate"),
    ({"input": "hi", "reasoning": {"effort": "high"}}, "unsupported", "reasoning"),
    ({"input": "hi", "background": True}, "unsupported", "background"),
    ({"input": "hi", "truncation": "auto"}, "unsupported", "truncation"),
    ({"input": "hi", "include": ["message.output_text.logprobs"]}, "unsupported", "include"),
    ({"input": "hi", "text": {"verbosity": "low"}}, "unsupported", "text.verbosity"),
    ({"input": "hi", "temperature": 3}, "invalid_request", "temperature"),
    ({"input": "hi", "max_output_tokens": 0}, "invalid_request", "max_output_tokens"),
    ({"input": []}, "invalid_request", "input"),
    ({"input": [{"role": "robot", "content": "x"}]}, "invalid_request", "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
     "unsupported", "input[0].content[0]"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object",
                                                                                      "oneOf": []}}}},
     "unsupported", "text.format.schema"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "unsupported", "tools[0].type"),
])
async def test_bad_fields_are_400_naming_them(client, body, code, param):
    resp = await client.post("/v1/responses", json={"model": MODEL, **body})
    assert resp.status == 400
    assert_error(await resp.json(), code, param)


def test_function_tools_and_calls_translate_to_the_chat_shape():
    tool = {"type": "function", "name": "get_weather", "description": "d", "parameters": {"type": "object"},
            "strict": True}
    body = responses_translate.decode_body({"model": MODEL, "input": "x", "tools": [tool],
                                            "tool_choice": {"type": "function", "name": "get_weather"}})
    chat, _ = responses_translate.chat_body(body, [], responses_translate.input_items(body))
    assert chat["tools"] == [{"type": "function", "function": {"name": "get_weather", "description": "d",
                                                               "parameters": {"type": "object"}, "strict": True}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}


def test_function_call_items_become_the_chat_calls_and_results():
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    output = {"type": "function_call_output", "call_id": "c1", "output": "42"}
    parsed = parse_responses({"model": MODEL, "input": [{"role": "user", "content": "x"}, call, output]})
    assert [m.role for m in parsed.parsed.messages] == ["user", "assistant", "tool"]
    with pytest.raises(BusError) as info:  # an output for a call the conversation never made
        parse_responses({"model": MODEL, "input": [{"role": "user", "content": "x"}, {**output, "call_id": "c9"}]})
    assert (info.value.code, info.value.param) == ("invalid_request", "input[1]") and "'c9'" in info.value.message


async def test_a_mid_stream_error_is_an_error_event_then_response_failed(client, engine):
    post = asyncio.create_task(client.post("/v1/responses", json={"model": MODEL, "input": "hi", "stream": True}))
    req = await engine.next_request()
    await engine.send(req, engine.start_event(req), TokenDelta(id=req.id, seq=1, text="par"))
    await engine.fail(req, "engine_failed", "the engine crashed", seq=2)
    events = _events(await (await post).text())
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2]["code"] == "engine_failed"
    assert events[-1]["response"]["status"] == "failed"
    assert events[-1]["response"]["error"]["code"] == "engine_failed"


async def test_an_error_before_the_first_token_is_a_plain_http_error(client, engine):
    post = asyncio.create_task(client.post("/v1/responses", json={"model": MODEL, "input": "hi", "stream": True}))
    req = await engine.next_request()
    await engine.fail(req, "engine_busy", "all slots taken")
    resp = await post
    assert resp.status == 503
    assert_error(await resp.json(), "engine_busy")


async def test_client_disconnect_mid_stream_cancels_the_request(client, engine, cancels):
    resp_task = asyncio.create_task(client.post("/v1/responses", json={"model": MODEL, "input": "hi",
                                                                       "stream": True}))
    req = await engine.next_request()
    await engine.send(req, engine.start_event(req), TokenDelta(id=req.id, seq=1, text="a"))
    resp = await resp_task
    await resp.content.readany()
    resp.close()  # the client goes away mid-stream
    assert (await cancels.wait_for(req.id)).reason == "client_disconnected"


async def test_priority_goes_to_its_lane(client, engine):
    post = asyncio.create_task(client.post("/v1/responses", json={"model": MODEL, "input": "hi", "priority": 5}))
    req = await engine.next_request("high")
    await engine.answer(req, ["ok"])
    assert (await post).status == 200


async def test_stored_responses_are_seen_only_by_the_key_that_created_them(nc, js, nats_server, engine):
    config = _auth_config(nats_server)
    store = await ApiKeyStore.bind(js)
    _, alice = await store.create("alice", [Scope.INFERENCE])
    _, bob = await store.create("bob", [Scope.INFERENCE])
    async with TestClient(TestServer(create_app(config))) as c:
        await wait_until_served(c)
        post = asyncio.create_task(c.post("/v1/responses", json={"model": MODEL, "input": "hi"},
                                          headers=bearer(alice)))
        await engine.serve_one(["secret"])
        created = await (await post).json()
        path = f"/v1/responses/{created['id']}"
        assert (await c.get(path, headers=bearer(alice))).status == 200
        for method in (c.get, c.delete):
            resp = await method(path, headers=bearer(bob))
            assert resp.status == 404
            assert_error(await resp.json(), "not_found")
        resp = await c.post("/v1/responses", json={"model": MODEL, "input": "hi", "previous_response_id":
                                                   created["id"]}, headers=bearer(bob))
        assert resp.status == 404
        assert (await c.get(f"{path}/input_items", headers=bearer(alice))).status == 200


def _auth_config(nats_server) -> EdgeConfig:
    """An edge that takes API keys only."""
    return EdgeConfig(nats_url=nats_server.url, liveness_interval=0.1, worker_lost_grace=0.2, request_timeout=10,
                      auth="keys")


async def test_a_stored_response_expires_after_responses_ttl(nc, edge_config, engine):
    config = msgspec.structs.replace(edge_config, responses_ttl=2)
    async with TestClient(TestServer(create_app(config))) as c:
        await wait_until_served(c)
        post = asyncio.create_task(c.post("/v1/responses", json={"model": MODEL, "input": "hi"}))
        await engine.serve_one(["x"])
        path = f"/v1/responses/{(await (await post).json())['id']}"
        assert (await c.get(path)).status == 200
        async with asyncio.timeout(20):  # nats-server drops it once its own TTL passed
            while (await c.get(path)).status == 200:
                await asyncio.sleep(0.1)
        resp = await c.get(path)
        assert resp.status == 404
        assert_error(await resp.json(), "not_found")


def test_responses_ttl_is_an_edge_flag():
    assert parse_args(["--responses-ttl", "3600"]).responses_ttl == 3600
    assert parse_args([]).responses_ttl == 30 * 86400


async def test_an_engine_lost_mid_stream_migrates_and_the_events_continue(client, engine, nc, js):
    spare = await BusEngine(nc, js, interval=0.3).start()
    try:
        post = asyncio.create_task(client.post("/v1/responses", json={"model": MODEL, "input": "hi", "stream": True,
                                                                      "max_output_tokens": 6}))
        first = await engine.next_request()
        await engine.send(first, engine.start_event(first), TokenDelta(id=first.id, seq=1, text="tok1 ", token_ids=[1]))
        await engine.stop_heartbeats()  # SIGKILL, as the edge sees it
        again = await spare.next_request()
        assert (again.attempt, again.continuation, again.sampling.max_tokens) == (1, "tok1 ", 5)
        await spare.answer(again, ["tok2"])
        events = _events(await (await post).text())
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        assert events[-1]["type"] == "response.completed"
        assert events[-1]["response"]["id"] == first.id  # one response throughout
        assert events[-1]["response"]["output"][0]["content"][0]["text"] == "tok1 tok2"
    finally:
        await spare.stop_heartbeats()


async def test_without_the_bucket_storing_is_503_and_store_false_still_works(nc, js, edge_config, engine):
    await js.delete_key_value(names.RESPONSES_BUCKET)
    async with TestClient(TestServer(create_app(edge_config))) as c:
        await wait_until_served(c)
        resp = await c.post("/v1/responses", json={"model": MODEL, "input": "hi"})
        assert resp.status == 503
        assert_error(await resp.json(), "unavailable")
        assert names.RESPONSES_BUCKET in (await resp.json())["error"]["message"]
        post = asyncio.create_task(c.post("/v1/responses", json={"model": MODEL, "input": "hi", "store": False}))
        await engine.serve_one(["ok"])
        resp = await post
        assert resp.status == 200 and (await resp.json())["output"][0]["content"][0]["text"] == "ok"
