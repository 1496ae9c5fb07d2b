"""Compatibility with the official ``openai`` package, against the edge in-process."""

from __future__ import annotations

import asyncio

import openai
import pytest

from schemas.events import TokenDelta
from tests.edge_harness import ALIAS, MODEL, client, edge_config, engine  # noqa: F401 - fixtures


@pytest.fixture
async def sdk(client):
    """An ``AsyncOpenAI`` pointed at the in-process edge."""
    async with openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0,
                                  timeout=10) as c:
        yield c


async def test_sdk_chat_non_stream(sdk, engine):
    call = asyncio.create_task(sdk.chat.completions.create(
        model=ALIAS, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=5, temperature=0))
    await engine.serve_one(["Hello", "!"])
    completion = await call
    assert completion.object == "chat.completion" and completion.model == MODEL
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "Hello!"
    assert completion.choices[0].finish_reason == "stop"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) == \
        (5, 2, 7)


async def test_sdk_chat_stream_with_usage(sdk, engine):
    async def consume():
        stream = await sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                   stream=True, stream_options={"include_usage": True})
        return [chunk async for chunk in stream]

    call = asyncio.create_task(consume())
    await engine.serve_one(["a", "b", "c"])
    chunks = await call
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "abc"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3


async def test_sdk_legacy_completion_stream(sdk, engine):
    async def consume():
        stream = await sdk.completions.create(model=MODEL, prompt="Once", stream=True)
        return [chunk async for chunk in stream]

    call = asyncio.create_task(consume())
    await engine.serve_one([" upon", " a time"])
    chunks = await call
    assert "".join(c.choices[0].text for c in chunks) == " upon a time"


async def test_sdk_raises_typed_errors(sdk):
    with pytest.raises(openai.NotFoundError) as not_found:
        await sdk.chat.completions.create(model="ghost", messages=[{"role": "user", "content": "hi"}])
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        await sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=17)
    assert bad.value.code == "invalid_request" and bad.value.param == "n"


async def test_sdk_sees_a_mid_stream_error_event_as_an_api_error(sdk, engine):
    async def consume():
        stream = await sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                   stream=True)
        return [chunk async for chunk in stream]

    call = asyncio.create_task(consume())
    req = await engine.next_request()
    await engine.send(req, engine.start_event(req), TokenDelta(id=req.id, seq=1, text="par"))
    await engine.fail(req, "engine_failed", "the engine crashed", seq=2)
    with pytest.raises(openai.APIError, match="the engine crashed"):
        await call
