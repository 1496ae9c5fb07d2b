"""Prompt-cache hits answered by the edge itself, on a real nats-server with a real scheduler and engine.

"Before" is an edge with ``cache_enabled=False``: every request goes through the queue and the
scheduler replays hits. Both edges run side by side on the same bus, so a hit answered each way
can be compared byte for byte (ids and timestamps aside).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re

import msgspec
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient, TestServer

from schemas import names
from schemas.cache import CachedDelta, CachedResponse
from schemas.events import Usage, encode
from schemas.inference import InferenceRequest
from services.common.buckets import kv_keys
from services.common.cache_key import cache_key
from services.edge import EdgeConfig, create_app
from services.edge.openai import translate as openai_translate
from services.edge.state import EDGE, METRICS
from tests.auth_support import AUDIENCE, ISSUER, bearer, hs256, make_keys
from tests.edge_harness import wait_until_served
from tests.engine.test_engine_service import running_engine
from tests.scheduler.test_scheduler_cache import until_entries
from tests.scheduler.test_scheduler_harness import count, eventually, start_scheduler  # noqa: F401

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def chat(**extra) -> dict:
    """A cacheable chat request for the simulated engine (temperature 0)."""
    return {"model": "sim", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 5,
            "temperature": 0, **extra}


def completion(**extra) -> dict:
    """A cacheable legacy completion request."""
    return {"model": "sim", "prompt": "one two three", "max_tokens": 5, "temperature": 0, **extra}


@pytest.fixture
async def engine(nats_server):
    async with running_engine(nats_server.url) as (_service, worker):
        yield worker


@pytest.fixture
def start_edge(nats_server):
    """``async with start_edge(**config) as client:`` an in-process edge that serves the simulated model."""

    @contextlib.asynccontextmanager
    async def run(**overrides):
        config = EdgeConfig(nats_url=nats_server.url, liveness_interval=0.1, request_timeout=10,
                            cache_mirror_check=0.1, **overrides)
        async with TestClient(TestServer(create_app(config))) as client:
            await wait_until_served(client, "sim")
            yield client

    return run


@pytest.fixture
async def stack(nc, start_scheduler, start_edge, engine):
    """(edge answering hits itself, edge leaving them to the scheduler, the scheduler), all running."""
    async with start_scheduler(cache_mirror_check=0.1) as scheduler, start_edge() as new, \
            start_edge(cache_enabled=False) as old:
        await eventually(lambda: scheduler.table.get(engine) is not None, what="the engine's heartbeat")
        yield new, old, scheduler


def edge_sample(client: TestClient, name: str, **labels) -> float:
    """One sample of the edge's metrics registry (0 when absent)."""
    return client.server.app[METRICS].registry.get_sample_value(name, labels) or 0.0


def kept(client: TestClient, key: str) -> CachedResponse | None:
    """What the edge's memory mirror holds under ``key``."""
    return client.server.app[EDGE].cache.reader.mirror.get(key)


def edge_hits(client: TestClient) -> tuple[float, float, float]:
    """(hits from memory, hits from KV, misses) the edge counted."""
    return (edge_sample(client, "llm_edge_cache_hits_total", source="memory"),
            edge_sample(client, "llm_edge_cache_hits_total", source="kv"),
            edge_sample(client, "llm_edge_cache_misses_total"))


async def post(client: TestClient, path: str, body: dict, headers: dict | None = None) -> tuple[int, str, str]:
    """(status, content type, body text) of one request."""
    resp = await client.post(path, json=body, headers=headers)
    return resp.status, resp.content_type, await resp.text()


def normalised(text: str) -> str:
    """``text`` with its response id and ``created`` timestamp replaced, the only parts that differ per request."""
    text = re.sub(r'"(id|requestId)":"[a-z]+-[0-9a-f]{32}"', r'"\1":"ID"', text)
    return re.sub(r'"created":\d+', '"created":0', text)


def answer_text(path: str, body: str) -> str:
    """The generated text of a JSON answer."""
    choice = json.loads(body)["choices"][0]
    return choice["message"]["content"] if path == CHAT else choice["text"]


@pytest.mark.parametrize("path, body", [
    (CHAT, chat()),
    (CHAT, chat(stream=True)),
    (CHAT, chat(stream=True, stream_options={"include_usage": True})),
    (COMPLETIONS, completion()),
    (COMPLETIONS, completion(stream=True)),
    ("/api/v1/inference", {"modelId": "sim", "prompt": "one two three",
                            "generation": {"max_new_tokens": 5, "temperature": 0}}),
    ("/api/v1/inference/stream", {"modelId": "sim", "prompt": "one two three",
                                   "generation": {"max_new_tokens": 5, "temperature": 0}}),
], ids=["chat", "chat-sse", "chat-sse-usage", "completion", "completion-sse", "native", "native-sse"])
async def test_a_hit_answered_by_the_edge_is_the_one_the_scheduler_answered(nc, js, stack, path, body):
    new, old, scheduler = stack
    first = await post(old, path, body)
    assert first[0] == 200, first
    await until_entries(js, 1, "the engine never stored the response")
    by_scheduler = await post(old, path, body)
    assert count(scheduler, "cached") == 1
    by_edge = await post(new, path, body)
    assert count(scheduler, "cached") == 1, "the edge passed a hit on to the scheduler"
    assert edge_hits(new) == (0, 1, 0)
    assert by_edge[:2] == by_scheduler[:2] == first[:2]
    assert normalised(by_edge[2]) == normalised(by_scheduler[2]) == normalised(first[2])
    again = await post(new, path, body)  # now from the edge's memory: still the same bytes
    assert normalised(again[2]) == normalised(by_edge[2]) and edge_hits(new) == (1, 1, 0)
    if not body.get("stream") and not path.endswith("/stream"):
        assert json.loads(by_edge[2])["usage"], "a JSON answer from the cache must carry its usage"


async def test_requests_differing_in_a_sampling_parameter_never_share_an_entry(nc, js, stack):
    new, _old, scheduler = stack
    variants = [chat(), chat(max_tokens=4), chat(stop=["tok3"]), chat(temperature=0.7, seed=1),
                chat(temperature=0.7, seed=2), chat(top_k=5)]
    texts = []
    for n, body in enumerate(variants, start=1):
        status, _, text = await post(new, CHAT, body)
        assert status == 200 and edge_hits(new) == (0, 0, n), f"{body} was answered from another entry"
        texts.append(answer_text(CHAT, text))
        await until_entries(js, n, f"{body} was not stored under its own key")
    assert texts[:3] == ["tok1 tok2 tok3 tok4 tok5 ", "tok1 tok2 tok3 tok4 ", "tok1 tok2 "]
    generated = count(scheduler, "dispatched")
    for n, (body, text) in enumerate(zip(variants, texts, strict=True), start=1):
        status, _, again = await post(new, CHAT, body)
        assert status == 200 and answer_text(CHAT, again) == text
        assert edge_hits(new) == (0, n, len(variants))
    assert count(scheduler, "dispatched") == generated and count(scheduler, "cached") == 0


# The simulated engine refuses logprobs (400): that answer proves the request reached an engine.
@pytest.mark.parametrize("body, headers, reason, status", [
    (chat(cache=False), None, "opted out", 200),
    (chat(temperature=0.7), None, "not deterministic", 200),
    (chat(), {"Idempotency-Key": "k-1"}, "Idempotency-Key", 200),
    (chat(n=2, seed=7), None, "n > 1", 200),
    (chat(logprobs=True), None, "logprobs", 400),
], ids=["opt-out", "sampled", "idempotency-key", "n", "logprobs"])
async def test_requests_the_edge_must_not_answer_from_the_cache_take_the_queue(nc, js, stack, body, headers,
                                                                              reason, status):
    new, _old, scheduler = stack
    # Fill the entries a request like this one (deterministic, no opt-out, no logprobs) is stored under.
    fill = {k: v for k, v in body.items() if k not in ("cache", "logprobs")} | {"temperature": 0}
    await post(new, CHAT, fill)
    await until_entries(js, body.get("n", 1), "the engine never stored the response")
    before, handled = edge_hits(new), count(scheduler, "cached") + count(scheduler, "dispatched")
    answered, _, text = await post(new, CHAT, body, headers)
    assert answered == status, text
    assert edge_hits(new) == before, f"the edge looked up a request with {reason}"
    # The scheduler counts a dispatch when the engine's "accepted" reaches it, which can come after the
    # engine's stream has already ended at the edge (a 5-token simulated answer).
    await eventually(lambda: count(scheduler, "cached") + count(scheduler, "dispatched") > handled,
                     what="the request to reach the queue")
    if body.get("n") == 2:
        assert len(json.loads(text)["choices"]) == 2


async def test_a_changed_or_deleted_entry_is_never_served_from_the_edges_memory(nc, js, stack):
    new, _old, scheduler = stack
    await post(new, CHAT, chat())
    await until_entries(js, 1, "the engine never stored the response")
    await post(new, CHAT, chat())
    await post(new, CHAT, chat())
    assert edge_hits(new) == (1, 1, 1)  # one read from KV, then kept in memory
    kv = await js.key_value(names.PROMPT_CACHE_BUCKET)
    [key] = await kv_keys(kv)
    replaced = CachedResponse(model="sim", deltas=[CachedDelta(text="a new "), CachedDelta(text="value")],
                              finish_reason="stop", usage=Usage(prompt_tokens=3, completion_tokens=2))
    await kv.put(key, encode(replaced))
    await eventually(lambda: kept(new, key) is None, what="the edge's watch to drop the replaced entry")
    status, _, text = await post(new, CHAT, chat())
    assert status == 200 and answer_text(CHAT, text) == "a new value"
    assert json.loads(text)["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    await kv.delete(key)
    await eventually(lambda: kept(new, key) is None, what="the edge's watch to drop the deleted entry")
    generated = count(scheduler, "dispatched")
    status, _, text = await post(new, CHAT, chat())
    assert status == 200 and answer_text(CHAT, text) == "tok1 tok2 tok3 tok4 tok5 "
    # (the engine's "accepted" may reach the scheduler after its answer reached the client: see above)
    await eventually(lambda: count(scheduler, "dispatched") == generated + 1, what="the request to be generated")


async def test_an_expired_entry_is_not_served_after_one_check_interval(nc, js, stack):
    # The bucket's TTL drops entries from the head of its stream; the edge notices the stream's first
    # sequence moving at its next check (cache_mirror_check, 0.1 s here) and drops what it kept.
    new, _old, scheduler = stack
    stream = names.kv_stream(names.PROMPT_CACHE_BUCKET)
    config = (await js.stream_info(stream)).config
    config.max_age = config.duplicate_window = 1.0
    await js.update_stream(config)
    await post(new, CHAT, chat())
    await until_entries(js, 1, "the engine never stored the response")
    await post(new, CHAT, chat())
    await post(new, CHAT, chat())
    assert edge_hits(new) == (1, 1, 1)
    deadline = asyncio.get_running_loop().time() + 5
    while (await js.stream_info(stream)).state.messages:
        assert asyncio.get_running_loop().time() < deadline, "the bucket never expired the entry"
        await asyncio.sleep(0.05)
    mirror = new.server.app[EDGE].cache.reader.mirror
    await eventually(lambda: len(mirror) == 0, what="the edge's next check to drop the expired entry")
    generated = count(scheduler, "dispatched")
    status, _, text = await post(new, CHAT, chat())
    assert status == 200 and answer_text(CHAT, text) == "tok1 tok2 tok3 tok4 tok5 "
    assert edge_hits(new) == (1, 1, 2)
    await eventually(lambda: count(scheduler, "dispatched") == generated + 1, what="the request to be generated")


async def test_a_hit_still_needs_credentials_and_counts_against_the_rate_limit(nc, js, tmp_path, start_scheduler,
                                                                             start_edge, engine):
    keys = make_keys(tmp_path)
    async with start_scheduler() as scheduler, start_edge(auth="jwt", jwt_secret_file=str(keys.secret_file),
                                                          jwt_audience=AUDIENCE, jwt_issuer=ISSUER,
                                                          rate_rpm=3) as new:
        await eventually(lambda: scheduler.table.get(engine) is not None, what="the engine's heartbeat")
        auth = bearer(hs256())
        assert (await post(new, CHAT, chat(), auth))[0] == 200
        await until_entries(js, 1, "the engine never stored the response")
        status, _, text = await post(new, CHAT, chat())
        assert status == 401, text
        resp = await new.post(CHAT, json=chat(), headers=auth)
        assert resp.status == 200 and resp.headers["x-ratelimit-remaining-requests"] == "1"
        assert edge_hits(new)[1] == 1
        assert (await post(new, CHAT, chat(), auth))[0] == 200
        status, _, text = await post(new, CHAT, chat(), auth)
        assert status == 429, text
        assert edge_hits(new)[:2] == (1, 1), "a refused request was answered from the cache"


@pytest.mark.parametrize("body", [
    chat(), chat(temperature=0, top_p=1, max_tokens=7, stop="x"), chat(seed=3, temperature=0.5, top_k=40),
    completion(presence_penalty=0, frequency_penalty=1, repetition_penalty=1.1),
])
def test_the_edge_keys_a_request_as_the_scheduler_keys_it_after_the_bus(body):
    # The edge keys the request it built, the scheduler the message it decoded from the queue: every
    # field (an int temperature, a stop string turned list...) must key alike both ways.
    parse = openai_translate.parse_chat if "messages" in body else openai_translate.parse_completion
    parsed = parse(json.dumps(body).encode(), default_max_tokens=16, max_n=4)
    req = openai_translate.to_request(parsed, request_id="chatcmpl-1", model="org/sim", reply_to="_INBOX.x",
                                      created=1.0, deadline=2.0)
    on_the_bus = msgspec.json.decode(encode(req), type=InferenceRequest)
    assert cache_key(req) == cache_key(on_the_bus, "org/sim")


async def ws_answer(client: TestClient, body: dict) -> list[str]:
    """The frames (raw text) answering one request sent on a fresh WebSocket, up to its terminal one."""
    frames = []
    async with client.ws_connect("/api/v1/inference/ws") as ws:
        await ws.send_json({"id": "q", **body})
        while True:
            msg = await ws.receive(timeout=10)
            assert msg.type is WSMsgType.TEXT, msg
            frames.append(msg.data)
            frame = json.loads(msg.data)
            if frame.get("done") or "error" in frame:
                return frames


async def test_a_websocket_request_gets_the_edges_hits_with_the_frames_the_scheduler_gave(nc, js, stack):
    new, old, scheduler = stack
    body = {"modelId": "sim", "prompt": "one two three", "generation": {"max_new_tokens": 5, "temperature": 0}}
    first = await ws_answer(old, body)
    await until_entries(js, 1, "the engine never stored the response")
    by_scheduler = await ws_answer(old, body)
    assert count(scheduler, "cached") == 1
    by_edge = await ws_answer(new, body)
    assert count(scheduler, "cached") == 1, "the edge passed a WebSocket hit on to the scheduler"
    assert edge_hits(new) == (0, 1, 0)
    assert [normalised(f) for f in by_edge] == [normalised(f) for f in by_scheduler] == [normalised(f) for f in first]
    assert "".join(json.loads(f).get("token", "") for f in by_edge) == "tok1 tok2 tok3 tok4 tok5 "
    assert json.loads(by_edge[-1])["done"] and json.loads(by_edge[-1])["usage"]["completionTokens"] == 5
    generated = count(scheduler, "dispatched")
    opted_out = await ws_answer(new, {**body, "cache": False})
    assert edge_hits(new) == (0, 1, 0), "the edge looked up a request that opted out"
    assert json.loads(opted_out[-1])["done"]
    await eventually(lambda: count(scheduler, "dispatched") == generated + 1, what="the request to be generated")
