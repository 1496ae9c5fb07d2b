"""OpenAI ``n`` > 1 and ``logprobs`` at the edge, through the official ``openai`` package.

The engine is ``BusEngine`` on the real bus: it sees exactly what the edge publishes (one request
per choice) and answers with the events an engine sends.
"""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from schemas.events import StreamEnd, StreamError, TokenDelta, TokenLogprob, TopLogprob, Usage
from tests.edge_harness import (  # noqa: F401 - fixtures
    MODEL,
    BusEngine,
    CancelRecorder,
    assert_error,
    chat_body,
    client,
    edge_config,
    engine,
    sse_payloads,
)

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def sdk(client):
    """An ``AsyncOpenAI`` pointed at the in-process edge."""
    async with openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0,
                                  timeout=10) as c:
        yield c


async def take(engine, n: int) -> list:
    """The ``n`` requests one ``n``-choice request was fanned out into, by choice number."""
    reqs = [await engine.next_request() for _ in range(n)]
    return sorted(reqs, key=lambda r: int(r.id.rsplit("-c", 1)[1]))


def lp(token_id: int, token: str, logprob: float, *top: tuple[int, str, float]) -> TokenLogprob:
    return TokenLogprob(token_id=token_id, token=token, logprob=logprob,
                        top=[TopLogprob(token_id=i, token=t, logprob=v) for i, t, v in top])


async def test_n_choices_are_n_requests_with_their_own_ids_and_seeds_merged_into_one_body(sdk, engine):
    call = asyncio.create_task(sdk.chat.completions.create(model=MODEL, messages=HI, n=3, seed=41, temperature=0.9))
    reqs = await take(engine, 3)
    parent = reqs[0].id.rsplit("-c", 1)[0]
    assert [r.id for r in reqs] == [f"{parent}-c{i}" for i in range(3)]
    assert [r.sampling.seed for r in reqs] == [41, 42, 43]  # reproducible as a whole, yet the choices differ
    assert all(r.sampling.n == 1 for r in reqs) and len({r.reply_to for r in reqs}) == 3
    for i, req in reversed(list(enumerate(reqs))):  # finishing out of order changes nothing
        await engine.answer(req, [f"answer {i}", "!" * (i + 1)], finish="length" if i == 1 else "stop")
    completion = await call
    assert completion.id == parent
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert [c.message.content for c in completion.choices] == ["answer 0!", "answer 1!!", "answer 2!!!"]
    assert [c.finish_reason for c in completion.choices] == ["stop", "length", "stop"]
    # OpenAI's convention: the prompt once, every choice's completion tokens.
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) == \
        (5, 6, 11)


async def test_without_a_seed_every_choice_draws_its_own(sdk, engine):
    call = asyncio.create_task(sdk.completions.create(model=MODEL, prompt="Once", n=2))
    reqs = await take(engine, 2)
    assert [r.sampling.seed for r in reqs] == [None, None]
    for req in reqs:
        await engine.answer(req, [" upon"])
    completion = await call
    assert [(c.index, c.text) for c in completion.choices] == [(0, " upon"), (1, " upon")]


async def test_streamed_choices_carry_their_index_each_finish_then_one_usage_chunk(sdk, engine):
    async def consume():
        stream = await sdk.chat.completions.create(model=MODEL, messages=HI, n=2, stream=True,
                                                   stream_options={"include_usage": True})
        return [chunk async for chunk in stream]

    call = asyncio.create_task(consume())
    first, second = await take(engine, 2)
    await engine.send(first, engine.start_event(first), TokenDelta(id=first.id, seq=1, text="A"))
    await engine.send(second, engine.start_event(second), TokenDelta(id=second.id, seq=1, text="B"))
    await engine.send(first, TokenDelta(id=first.id, seq=2, text="a"),
                      StreamEnd(id=first.id, seq=3, finish_reason="stop", usage=Usage(prompt_tokens=5,
                                                                                       completion_tokens=2)))
    await engine.send(second, StreamEnd(id=second.id, seq=2, finish_reason="length",
                                        usage=Usage(prompt_tokens=5, completion_tokens=1)))
    chunks = await call
    text = {0: "", 1: ""}
    finish = {}
    for chunk in chunks[:-1]:
        assert len(chunk.choices) == 1 and chunk.usage is None
        choice = chunk.choices[0]
        text[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            assert choice.index not in finish
            finish[choice.index] = choice.finish_reason
    assert text == {0: "Aa", 1: "B"} and finish == {0: "stop", 1: "length"}
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1]
    assert chunks[-1].choices == [] and (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (5, 3)


async def test_an_error_in_one_streamed_choice_ends_the_stream_and_cancels_the_others(client, engine, nc):
    cancels = await CancelRecorder().start(nc)
    post = asyncio.create_task(client.post(CHAT, json=chat_body(n=2, stream=True)))
    first, second = await take(engine, 2)
    await engine.send(first, engine.start_event(first), TokenDelta(id=first.id, seq=1, text="A"))
    await engine.fail(second, "internal", "tokenizer crashed", seq=1)  # not one that fails over
    resp = await post
    assert resp.status == 200
    payloads = sse_payloads(await resp.text())
    assert payloads[-1] == "[DONE]"
    assert json.loads(payloads[-2])["error"]["code"] == "internal"
    assert (await cancels.wait_for(first.id)).id == first.id  # the healthy choice is stopped too


async def test_an_error_before_the_first_byte_is_an_http_error_and_cancels_the_others(client, engine, nc):
    cancels = await CancelRecorder().start(nc)
    post = asyncio.create_task(client.post(CHAT, json=chat_body(n=3, stream=True)))
    reqs = await take(engine, 3)
    await engine.fail(reqs[2], "context_length_exceeded", "too long")
    resp = await post
    assert resp.status == 400
    assert_error(await resp.json(), "context_length_exceeded")
    for req in reqs[:2]:
        assert (await cancels.wait_for(req.id)).reason == "cancelled"


async def test_a_client_that_goes_away_cancels_every_choice(client, engine, nc):
    cancels = await CancelRecorder().start(nc)
    post = asyncio.create_task(client.post(CHAT, json=chat_body(n=2)))
    reqs = await take(engine, 2)
    post.cancel()
    for req in reqs:
        assert (await cancels.wait_for(req.id)).reason == "client_disconnected"


async def test_chat_logprobs_in_the_openai_shape_streamed_and_not(sdk, engine):
    call = asyncio.create_task(sdk.chat.completions.create(model=MODEL, messages=HI, logprobs=True, top_logprobs=2))
    req = await engine.next_request()
    assert req.sampling.logprobs == 2
    await engine.send(req, engine.start_event(req),
                      TokenDelta(id=req.id, seq=1, text="Hé", token_ids=[7, 8],
                                 logprobs=[lp(7, "H", -0.1, (7, "H", -0.1), (3, "A", -2.0)),
                                           lp(8, "é", -0.7, (8, "é", -0.7), (4, "e", -0.9))]),
                      StreamEnd(id=req.id, seq=2, finish_reason="stop", usage=Usage(prompt_tokens=5,
                                                                                     completion_tokens=2)))
    completion = await call
    content = completion.choices[0].logprobs.content
    assert [(c.token, c.logprob, c.bytes) for c in content] == [("H", -0.1, [72]), ("é", -0.7, [195, 169])]
    assert [(t.token, t.logprob) for t in content[1].top_logprobs] == [("é", -0.7), ("e", -0.9)]

    async def consume():
        stream = await sdk.chat.completions.create(model=MODEL, messages=HI, logprobs=True, stream=True)
        return [chunk async for chunk in stream]

    call = asyncio.create_task(consume())
    req = await engine.next_request()
    assert req.sampling.logprobs == 0
    await engine.send(req, engine.start_event(req),
                      TokenDelta(id=req.id, seq=1, text="Hi", token_ids=[9], logprobs=[lp(9, "Hi", -0.25)]),
                      StreamEnd(id=req.id, seq=2, finish_reason="stop", usage=Usage(prompt_tokens=5,
                                                                                     completion_tokens=1)))
    chunks = await call
    with_logprobs = [c for c in chunks if c.choices and c.choices[0].logprobs is not None]
    assert [(e.token, e.logprob, e.top_logprobs) for e in with_logprobs[0].choices[0].logprobs.content] == \
        [("Hi", -0.25, [])]


async def test_completion_logprobs_in_the_legacy_shape(sdk, engine):
    call = asyncio.create_task(sdk.completions.create(model=MODEL, prompt="Once", logprobs=1, n=2, seed=3))
    reqs = await take(engine, 2)
    assert [r.sampling.logprobs for r in reqs] == [1, 1]
    for req in reqs:
        await engine.send(req, engine.start_event(req),
                          TokenDelta(id=req.id, seq=1, text=" upon a", token_ids=[1, 2],
                                     logprobs=[lp(1, " upon", -0.5, (4, " up", -0.4)), lp(2, " a", -0.2, (2, " a", -0.2))]),
                          StreamEnd(id=req.id, seq=2, finish_reason="length",
                                    usage=Usage(prompt_tokens=2, completion_tokens=2)))
    completion = await call
    for choice in completion.choices:
        assert choice.logprobs.tokens == [" upon", " a"]
        assert choice.logprobs.token_logprobs == [-0.5, -0.2]
        assert choice.logprobs.text_offset == [0, 5]
        # the alternatives asked for, plus the sampled token (OpenAI: up to logprobs + 1 entries)
        assert choice.logprobs.top_logprobs == [{" up": -0.4, " upon": -0.5}, {" a": -0.2}]
    assert completion.usage.completion_tokens == 4


async def test_an_engine_without_logprobs_is_a_400_naming_logprobs(sdk, engine):
    call = asyncio.create_task(sdk.chat.completions.create(model=MODEL, messages=HI, logprobs=True))
    req = await engine.next_request()
    await engine.send(req, StreamError(id=req.id, code="unsupported", param="logprobs",
                                       message="the llama.cpp engine does not report log-probabilities"))
    with pytest.raises(openai.BadRequestError) as bad:
        await call
    assert bad.value.code == "unsupported" and bad.value.param == "logprobs"


async def test_a_choice_whose_engine_fails_is_failed_over_alone(sdk, engine, nc, js):
    other = await BusEngine(nc, js).start()  # somewhere to fail over to
    call = asyncio.create_task(sdk.chat.completions.create(model=MODEL, messages=HI, n=2, seed=5))
    first, second = await take(engine, 2)
    await engine.answer(first, ["one"])
    await engine.send(second, engine.start_event(second))
    await engine.fail(second, "engine_failed", "device fault")
    retry = await engine.next_request()
    assert retry.id == f"{second.id}-r1" and retry.attempt == 1 and retry.sampling.seed == 6
    await engine.answer(retry, ["two"])
    completion = await call
    assert [c.message.content for c in completion.choices] == ["one", "two"]
    await other.stop_heartbeats()


@pytest.mark.parametrize("body, param", [
    (chat_body(logprobs=1), "logprobs"),
    (chat_body(logprobs="yes"), "logprobs"),
    (chat_body(top_logprobs=2), "top_logprobs"),
    (chat_body(logprobs=False, top_logprobs=2), "top_logprobs"),
    (chat_body(logprobs=True, top_logprobs=21), "top_logprobs"),
    (chat_body(logprobs=True, top_logprobs="3"), "top_logprobs"),
    (chat_body(n=17), "n"),
    (chat_body(n="2"), "n"),
])
async def test_bad_n_and_logprobs_are_invalid_requests(client, body, param):
    resp = await client.post(CHAT, json=body)
    assert resp.status == 400
    assert_error(await resp.json(), "invalid_request", param)


@pytest.mark.parametrize("logprobs", [True, 6, -1, "2"])
async def test_bad_legacy_logprobs_are_invalid_requests(client, logprobs):
    resp = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "logprobs": logprobs})
    assert resp.status == 400
    assert_error(await resp.json(), "invalid_request", "logprobs")


async def test_an_idempotency_key_with_several_choices_is_refused(client):
    resp = await client.post(CHAT, json=chat_body(n=2), headers={"Idempotency-Key": "k1"})
    assert resp.status == 400
    assert_error(await resp.json(), "unsupported", "n")
