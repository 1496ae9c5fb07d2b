"""OpenAI ``n`` and ``logprobs`` end to end on the real default model (``cy up``), via the openai package."""

from __future__ import annotations

import openai
import pytest
import pytest_asyncio

from services.common.model_store import DEFAULT_MODEL_ID
from tests.support import CyUp, state_dir_with_models

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

STORY = [{"role": "user", "content": "Tell me a short story about a fox."}]


@pytest.fixture(scope="module")
def platform(tmp_path_factory, default_model_dir):
    with CyUp(state_dir_with_models(tmp_path_factory.mktemp("e2e-choices"), default_model_dir),
              "--engine", "transformers") as up:
        yield up


@pytest_asyncio.fixture(loop_scope="module")
async def client(platform):
    async with openai.AsyncOpenAI(base_url=f"{platform.url}/v1", api_key="unused", max_retries=0,
                                  timeout=120) as c:
        yield c


async def test_n_seeded_choices_are_reproducible_and_differ_streamed_or_not(platform, client):
    # Every answer compared is generated (no prompt cache): a replay of the first would match it by construction.
    args = dict(model=DEFAULT_MODEL_ID, messages=STORY, n=3, seed=1234, temperature=1.0, max_tokens=12,
                extra_body={"cache": False})
    before = await platform.generated_tokens()
    first = await client.chat.completions.create(**args)
    again = await client.chat.completions.create(**args)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") for c in first.choices)
    assert [c.message.content for c in again.choices] == texts  # the whole response is reproducible
    assert len(set(texts)) > 1  # yet the choices are not copies of one another
    one = await client.chat.completions.create(**{**args, "n": 1})
    prompt = one.usage.prompt_tokens
    assert first.usage.prompt_tokens == prompt  # the prompt once, as OpenAI counts it
    assert first.usage.completion_tokens <= 3 * 12 and first.usage.total_tokens == prompt + first.usage.completion_tokens

    stream = await client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    streamed, finishes, usage = {0: "", 1: "", 2: ""}, {}, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert [streamed[i] for i in range(3)] == texts
    assert finishes == {i: c.finish_reason for i, c in enumerate(first.choices)}
    assert (usage.prompt_tokens, usage.completion_tokens) == (first.usage.prompt_tokens, first.usage.completion_tokens)
    generated = first.usage.completion_tokens + again.usage.completion_tokens + one.usage.completion_tokens
    assert await platform.generated_tokens() - before == generated + usage.completion_tokens


async def test_logprobs_on_the_transformers_engine_streamed_and_not(platform, client):
    args = dict(model=DEFAULT_MODEL_ID, messages=STORY, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3,
                extra_body={"cache": False})
    before = await platform.generated_tokens()
    whole = await client.chat.completions.create(**args)
    content = whole.choices[0].logprobs.content
    assert "".join(c.token for c in content).strip() and len(content) == whole.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the sampled token is the top one
    stream = await client.chat.completions.create(**args, stream=True)
    streamed = [e async for chunk in stream for choice in chunk.choices if choice.logprobs
                for e in choice.logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]
    assert await platform.generated_tokens() - before == 2 * whole.usage.completion_tokens  # both generated

    legacy = await client.completions.create(model=DEFAULT_MODEL_ID, prompt="The capital of France is", max_tokens=4,
                                             temperature=0, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == legacy.usage.completion_tokens
    assert all(len(top) in (2, 3) for top in lp.top_logprobs)  # the 2 best plus the sampled token
