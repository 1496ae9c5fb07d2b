"""End to end, started the way a user starts it (``cy up``), driven by the official openai package."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import msgspec
import nats
import openai
import pytest
import pytest_asyncio
from transformers import AutoTokenizer

from schemas import names
from schemas.heartbeat import EngineHeartbeat
from services.common.model_store import DEFAULT_MODEL_ID
from tests.support import CyUp, sse_events, state_dir_with_models, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def platform(tmp_path_factory, default_model_dir):
    # The answers are checked against the full-precision model's tokenizer and greedy output: transformers.
    with CyUp(state_dir_with_models(tmp_path_factory.mktemp("e2e"), default_model_dir), "--engine", "transformers") as up:
        yield up


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest_asyncio.fixture(loop_scope="module")
async def client(platform):
    async with openai.AsyncOpenAI(base_url=f"{platform.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


async def test_banner_tells_how_to_use_it(platform):
    out = platform.output()
    assert platform.url in out and platform.nats_url in out and "curl" in out


async def test_services_serve_prometheus_metrics_on_the_ports_the_banner_names(platform, client):
    await client.chat.completions.create(model=DEFAULT_MODEL_ID, messages=QUESTION, max_tokens=4)
    out = platform.output()
    assert f":{platform.metrics_port}" in out
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{platform.metrics_port}/metrics") as resp:
            text = await resp.text()
    assert "llm_scheduler_inference_requests_total" in text  # the scheduler's own series
    if f"engine :{platform.metrics_port + 1}" in out:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{platform.metrics_port + 1}/metrics") as resp:
                assert "llm_engine_inference_latency" in await resp.text()


async def test_models_lists_what_live_engines_serve(client):
    models = await client.models.list()
    assert DEFAULT_MODEL_ID in [m.id for m in models.data]


async def test_chat_non_streaming(client):
    r = await client.chat.completions.create(model=DEFAULT_MODEL_ID, messages=QUESTION, max_tokens=24,
                                             temperature=0)
    assert r.object == "chat.completion"
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")


async def test_streamed_text_equals_non_streamed_text_at_temperature_zero(platform, client):
    # Both generated (no prompt cache): with it, the second would be a replay of the first.
    before = await platform.generated_tokens()
    whole = await client.chat.completions.create(model=DEFAULT_MODEL_ID, messages=QUESTION, max_tokens=24,
                                                 temperature=0, extra_body={"cache": False})
    stream = await client.chat.completions.create(model=DEFAULT_MODEL_ID, messages=QUESTION, max_tokens=24,
                                                  temperature=0, stream=True, extra_body={"cache": False},
                                                  stream_options={"include_usage": True})
    pieces, usage, finish = [], None, None
    async for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert len(pieces) > 3, "expected token-by-token chunks"
    assert "".join(pieces) == whole.choices[0].message.content
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert finish == whole.choices[0].finish_reason
    assert await platform.generated_tokens() - before == 2 * usage.completion_tokens  # the engine made both


async def test_legacy_completion(client):
    r = await client.completions.create(model=DEFAULT_MODEL_ID, prompt="The capital of France is", max_tokens=8,
                                        temperature=0)
    assert r.object == "text_completion" and r.choices[0].text
    assert r.usage.completion_tokens <= 8


async def test_usage_counts_are_the_tokenizers_counts(client, tokenizer):
    r = await client.chat.completions.create(model=DEFAULT_MODEL_ID, messages=QUESTION, max_tokens=20,
                                             temperature=0)
    prompt_ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == len(tokenizer.encode(r.choices[0].message.content,
                                                             add_special_tokens=False))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


async def test_bad_input_gets_openai_errors_and_the_service_stays_healthy(platform, client):
    url = f"{platform.url}/v1/chat/completions"
    cases = [
        (b"{not json", 400),
        (json.dumps({"messages": QUESTION}).encode(), 400),  # no model
        (json.dumps({"model": DEFAULT_MODEL_ID, "messages": "hi"}).encode(), 400),  # wrong type
        (json.dumps({"model": DEFAULT_MODEL_ID, "messages": QUESTION, "temperature": 9}).encode(), 400),
        (json.dumps({"model": DEFAULT_MODEL_ID, "messages": QUESTION, "max_tokens": 0}).encode(), 400),
        (json.dumps({"model": "no-such-model", "messages": QUESTION}).encode(), 404),
    ]
    async with aiohttp.ClientSession() as http:
        for body, status in cases:
            async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
                err = (await resp.json())["error"]
                assert resp.status == status, (body, err)
                assert err["message"] and err["type"]
                if status == 404:
                    assert err["code"] == "model_not_found"
        for _ in range(10):  # a burst of bad requests
            await asyncio.gather(*[http.post(url, data=cases[i % len(cases)][0]) for i in range(30)])
        async with http.get(f"{platform.url}/healthz") as resp:
            assert resp.status == 200
    r = await client.chat.completions.create(model=DEFAULT_MODEL_ID, messages=QUESTION, max_tokens=4)
    assert r.choices[0].message.content is not None


async def test_client_disconnect_cancels_the_generation(platform):
    nc = await platform.nats_connect("operator")  # operators may watch heartbeats
    latest: dict[str, EngineHeartbeat] = {}

    async def on_status(msg):
        hb = msgspec.json.decode(msg.data, type=EngineHeartbeat)
        latest[hb.worker] = hb

    await nc.subscribe(names.WORKER_STATUS_ALL, cb=on_status)
    body = {"model": DEFAULT_MODEL_ID, "stream": True, "max_tokens": 2000, "temperature": 0.7,
            "messages": [{"role": "user", "content": "Write a very long essay about the ocean."}]}
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"{platform.url}/v1/chat/completions", json=body)
        async for raw in resp.content:  # read until the first token arrives, then hang up
            if b'"content":"' in raw and b'"content":""' not in raw:
                break
        assert any(hb.in_flight for hb in latest.values())
        resp.close()

    async def idle():
        return latest and all(hb.in_flight == 0 for hb in latest.values())

    # 2000 tokens would take minutes; a cancelled request frees the engine within a couple of seconds.
    assert await wait_for(idle, timeout=10)
    await nc.close()


async def test_nats_native_producer_with_nothing_but_a_nats_client(platform):
    """The README's NATS-native example: plain nats-py and JSON, no project code on the client side.

    The bus is authenticated: the producer connects with its nkey seed and keeps its inboxes under
    its own root, the only ``_INBOX`` subjects its user may subscribe to.
    """
    nc = await nats.connect(platform.nats_url, nkeys_seed=platform.nkey("producer"), inbox_prefix="_INBOX.producer")
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    request = {"id": "native-1", "model": DEFAULT_MODEL_ID, "reply_to": inbox,
               "messages": [{"role": "user", "content": "Name a color."}],
               "sampling": {"max_tokens": 8, "temperature": 0}}
    await nc.jetstream().publish("llm.v1.infer.submit.normal", json.dumps(request).encode())
    events = []
    while not events or events[-1]["type"] not in ("end", "error"):
        events.append(json.loads((await sub.next_msg(timeout=30)).data))
    await nc.close()
    assert events[0]["type"] == "start" and events[0]["id"] == "native-1"
    deltas = [e for e in events if e["type"] == "delta"]
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    assert events[-1]["type"] == "end" and events[-1]["usage"]["completion_tokens"] <= 8
    assert "".join(d["text"] for d in deltas).strip()


async def test_the_bus_refused_no_service_and_no_stranger_gets_in(platform):
    """Every service did all of the above within its own NATS permissions; a client without a seed is refused."""
    assert platform.bus_refusals() == []
    assert "authenticated: one nkey user per service" in platform.output()
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(platform.nats_url, allow_reconnect=False, max_reconnect_attempts=0)
