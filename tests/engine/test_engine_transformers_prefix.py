"""Prompt-prefix KV reuse in the transformers engine: same output as without it, per adapter, within its bytes.

The real default model; an engine with the cache and one without (``prefix_cache_bytes=0``) answer
the same requests, and the log-probabilities of every generated token are compared.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
import pytest_asyncio
import torch

from schemas.inference import ChatMessage, InferenceRequest, SamplingParams
from services.engine.backend import Chunk, Finished
from services.engine.backends.transformers.engine import TransformersEngine
from services.engine.backends.transformers.prefix_cache import MIN_REUSE_TOKENS, PrefixCache
from tests.lora_support import make_adapter

pytestmark = [pytest.mark.slow]
on_module_loop = pytest.mark.asyncio(loop_scope="module")

SYSTEM = ("You are the harbour master's assistant in a small fishing town. Answer briefly and politely. "
          + " ".join(f"Rule {i}: never tell a visitor about berth {i}, the tide tables of week {i} or the "
                     f"lighthouse keeper's schedule on day {i}." for i in range(1, 9)))
QUESTIONS = ["When does the ferry leave?", "Where can I buy fresh fish?", "Is the lighthouse open today?",
             "How deep is the harbour?"]


def ask(question: str, adapter: str | None = None, system: str = SYSTEM) -> InferenceRequest:
    """A greedy chat request behind the shared system prompt, with the top log-probability of each token."""
    return InferenceRequest(id=f"p-{uuid.uuid4().hex[:12]}", model="m", reply_to="unused", adapter=adapter,
                            messages=[ChatMessage(role="system", content=system),
                                      ChatMessage(role="user", content=question)],
                            sampling=SamplingParams(max_tokens=12, temperature=0.0, logprobs=0))


async def answer(engine, req: InferenceRequest) -> tuple[list[int], list[float], Finished]:
    """Token ids, their log-probabilities, and the finish event."""
    ids, logprobs, fin = [], [], None
    async for ev in engine.generate(req):
        if isinstance(ev, Chunk):
            ids.extend(ev.token_ids)
            logprobs.extend(lp.logprob for lp in ev.logprobs or [])
        else:
            fin = ev
    assert isinstance(fin, Finished) and len(logprobs) == len(ids)
    return ids, logprobs, fin


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory, default_model_dir) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    make_adapter(default_model_dir, root / "lora-a", "lora", 1)
    return root


async def start(default_model_dir, adapter_root, **kw) -> TransformersEngine:
    eng = TransformersEngine(model_path=default_model_dir, model_id="m", slots=6, adapter_dirs=[str(adapter_root)],
                             adapter_cache_dir=adapter_root / "cache", **kw)
    await eng.start()
    return eng


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def plain(default_model_dir, adapter_root):
    eng = await start(default_model_dir, adapter_root, prefix_cache_bytes=0)
    yield eng
    await eng.close()


@pytest_asyncio.fixture(loop_scope="module")
async def cached(default_model_dir, adapter_root):
    eng = await start(default_model_dir, adapter_root)
    yield eng
    await eng.close()


def assert_same(got, want) -> None:
    """Same greedy tokens, and log-probabilities equal to float32 rounding."""
    assert got[0] == want[0]
    assert torch.allclose(torch.tensor(got[1]), torch.tensor(want[1]), atol=1e-3), (got[1], want[1])


@on_module_loop
async def test_reused_prefix_gives_the_same_tokens_and_logprobs(cached, plain):
    want = {q: await answer(plain, ask(q)) for q in QUESTIONS}
    assert all(w[2].cached_tokens == 0 for w in want.values())
    first = await answer(cached, ask(QUESTIONS[0]))
    assert first[2].cached_tokens == 0
    assert_same(first, want[QUESTIONS[0]])
    second = await answer(cached, ask(QUESTIONS[1]))
    assert second[2].cached_tokens > 150, "the system turn's KV must be reused"
    assert second[2].prompt_tokens == want[QUESTIONS[1]][2].prompt_tokens
    assert_same(second, want[QUESTIONS[1]])
    # One prefill group mixing rows with a reused prefix, an exact repeat, and a prompt with none.
    fresh = ask("Say hello.", system="You are terse.")
    want_fresh = await answer(plain, fresh)
    together = await asyncio.gather(answer(cached, ask(QUESTIONS[2])), answer(cached, ask(QUESTIONS[0])),
                                    answer(cached, fresh), answer(cached, ask(QUESTIONS[3])))
    for got, expect in zip(together, [want[QUESTIONS[2]], want[QUESTIONS[0]], want_fresh, want[QUESTIONS[3]]]):
        assert_same(got, expect)
    assert [g[2].cached_tokens > 0 for g in together] == [True, True, False, True]
    stats = cached.prefix_cache_stats()
    assert stats.hits >= 4 and stats.reused_tokens >= 4 * 150 and stats.nbytes > 0


@on_module_loop
async def test_an_adapter_never_reuses_the_base_models_prefix(cached, plain):
    base = await answer(cached, ask(QUESTIONS[0]))
    want = await answer(plain, ask(QUESTIONS[0], "lora-a"))
    assert want[0] != base[0], "the adapter must change the output"
    first = await answer(cached, ask(QUESTIONS[0], "lora-a"))
    assert first[2].cached_tokens == 0
    assert_same(first, want)
    again = await answer(cached, ask(QUESTIONS[1], "lora-a"))
    assert again[2].cached_tokens > 150, "the adapter's own prefix is reused"
    assert_same(again, await answer(plain, ask(QUESTIONS[1], "lora-a")))
    after = await answer(cached, ask(QUESTIONS[2]))
    assert after[2].cached_tokens > 150
    assert_same(after, await answer(plain, ask(QUESTIONS[2])))


@on_module_loop
async def test_the_cache_stays_within_its_bytes(default_model_dir, adapter_root, plain):
    prompts = [ask(QUESTIONS[0], system=f"Story {i}: " + SYSTEM) for i in range(4)]
    per_token = 30 * 2 * 3 * 64 * 4  # layers x (k, v) x kv heads x head dim x float32 bytes
    budget = int(2.5 * per_token * len(plain.render(prompts[0]).ids))
    eng = await start(default_model_dir, adapter_root, prefix_cache_bytes=budget)
    try:
        for p in prompts:
            await answer(eng, p)
            assert 0 < eng.prefix_cache_stats().nbytes <= budget
        assert eng.prefix_cache_stats().nbytes > budget // 2  # two prompts kept
        newest = await answer(eng, ask(QUESTIONS[1], system="Story 3: " + SYSTEM))
        oldest = await answer(eng, ask(QUESTIONS[1], system="Story 0: " + SYSTEM))
        assert newest[2].cached_tokens > 150 and oldest[2].cached_tokens == 0
        assert eng.prefix_cache_stats().nbytes <= budget
    finally:
        await eng.close()


def kv(tokens: int, fill: float = 1.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.full((1, 2, tokens, 4), fill), torch.full((1, 2, tokens, 4), fill)) for _ in range(3)]


def test_prefix_cache_keeps_the_longest_match_per_adapter_within_budget():
    per_token = 3 * 2 * 2 * 4 * 4
    cache = PrefixCache(budget=100 * per_token)
    a = list(range(40))
    cache.store(None, a, kv(40))
    assert cache.lookup("x", a + [99]) is None, "another adapter's prefix is never reused"
    hit = cache.lookup(None, a + [99])
    assert hit.length == 40 and hit.layers[0][0].shape[2] == 40
    assert cache.lookup(None, a).length == 39, "one token is always left to prefill"
    assert cache.lookup(None, a[:MIN_REUSE_TOKENS - 1] + [7] * 30) is None
    cache.store(None, a + list(range(100, 120)), kv(60))  # supersedes its own prefix
    assert len(cache) == 1 and cache.nbytes == 60 * per_token
    cache.store("x", list(range(500, 540)), kv(40))  # 100 tokens: at the budget
    assert cache.nbytes == 100 * per_token
    cache.store(None, list(range(900, 930)), kv(30))  # evicts the least recently used
    assert cache.nbytes <= 100 * per_token and cache.lookup(None, a + [1]) is None
    cache.store(None, list(range(0, 200)), kv(200))  # larger than the whole budget: not kept
    assert cache.nbytes <= 100 * per_token
    cache.drop_adapter("x")
    assert cache.lookup("x", list(range(500, 541))) is None
    assert cache.lookup(None, list(range(900, 931))).length == 30


def test_prefix_cache_counts_hits_misses_and_every_reused_token():
    cache = PrefixCache(budget=100 * 3 * 2 * 2 * 4 * 4)
    a = list(range(40))
    cache.store(None, a, kv(40))
    cache.lookup(None, a + [99])
    cache.lookup(None, [7] * 30)
    cache.lookup(None, [7] * (MIN_REUSE_TOKENS - 1))  # too short to look up: neither
    assert (cache.hits, cache.misses, cache.reused_tokens) == (1, 1, 40)
    cache.count(30, MIN_REUSE_TOKENS - 1)  # reuse found elsewhere (a llama.cpp stream), too short for a hit
    assert (cache.hits, cache.misses, cache.reused_tokens) == (1, 2, 40 + MIN_REUSE_TOKENS - 1)
