"""Log-probabilities from the engines: real numbers from the transformers engine, refusals elsewhere."""

from __future__ import annotations

import asyncio
import importlib.util
import math
import uuid

import pytest
import pytest_asyncio
import torch
from transformers import AutoModelForCausalLM

from schemas.errors import BusError
from schemas.inference import ChatMessage, InferenceRequest, SamplingParams
from services.engine.backend import Chunk, Finished
from services.engine.backends import backend_class

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

QUESTION = "Name three colours."


def chat(**sampling) -> InferenceRequest:
    sampling.setdefault("max_tokens", 8)
    return InferenceRequest(id=f"lp-{uuid.uuid4().hex[:12]}", model="m", reply_to="unused",
                            messages=[ChatMessage(role="user", content=QUESTION)], sampling=SamplingParams(**sampling))


async def run(engine, req) -> tuple[list[Chunk], Finished]:
    chunks, fin = [], None
    async for ev in engine.generate(req):
        if isinstance(ev, Chunk):
            chunks.append(ev)
        else:
            fin = ev
    return chunks, fin


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(default_model_dir):
    eng = backend_class("transformers")(model_path=default_model_dir, model_id="m", slots=4, device="cpu")
    await eng.start()
    yield eng
    await eng.close()


@pytest.fixture(scope="module")
def reference(default_model_dir):
    """The model loaded straight with transformers: the log-softmax of its logits after a given prefix."""
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()

    def logprobs(prompt_ids: list[int], generated: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([prompt_ids + generated])).logits[0].float()
        return torch.log_softmax(logits[len(prompt_ids) - 1:-1], dim=-1)  # row j predicts generated[j]

    return logprobs


def entries_of(chunks: list[Chunk]) -> tuple[list[int], list]:
    ids = [i for c in chunks for i in c.token_ids]
    entries = [e for c in chunks for e in (c.logprobs or [])]
    assert len(entries) == len(ids) and [e.token_id for e in entries] == ids  # aligned with token_ids
    return ids, entries


async def test_greedy_logprobs_are_the_models_own_and_the_sampled_token_is_the_top_one(engine, reference):
    req = chat(temperature=0.0, logprobs=5)
    chunks, fin = await run(engine, req)
    ids, entries = entries_of(chunks)
    assert len(ids) == fin.completion_tokens > 0
    expected = reference(engine.render(req).ids, ids)
    for j, entry in enumerate(entries):
        assert entry.logprob == pytest.approx(float(expected[j, ids[j]]), abs=2e-3)
        assert entry.token == engine.tokenizer.decode([ids[j]])
        assert len(entry.top) == 5
        tops = [t.logprob for t in entry.top]
        assert tops == sorted(tops, reverse=True)
        assert entry.top[0].token_id == ids[j] and entry.top[0].logprob == pytest.approx(entry.logprob)
        best = torch.topk(expected[j], 5)
        assert [t.token_id for t in entry.top] == best.indices.tolist()
        assert tops == pytest.approx(best.values.tolist(), abs=2e-3)


async def test_sampled_logprobs_are_raw_not_after_temperature_or_penalties(engine, reference):
    req = chat(temperature=1.7, top_k=5, presence_penalty=1.5, seed=11, logprobs=0, max_tokens=6)
    chunks, _ = await run(engine, req)
    ids, entries = entries_of(chunks)
    expected = reference(engine.render(req).ids, ids)
    for j, entry in enumerate(entries):
        assert entry.top == []  # logprobs 0: the sampled token's alone
        assert entry.logprob == pytest.approx(float(expected[j, ids[j]]), abs=2e-3)
    # Same seed, with and without logprobs: asking for them never changes what is sampled.
    plain, _ = await run(engine, chat(temperature=1.7, top_k=5, presence_penalty=1.5, seed=11, max_tokens=6))
    assert [i for c in plain for i in c.token_ids] == ids
    assert all(c.logprobs is None for c in plain)


async def test_logprobs_in_one_batch_with_requests_without_them(engine, reference):
    with_lp, without = chat(temperature=0.0, logprobs=2), chat(temperature=0.0, max_tokens=12)
    (chunks, _), _ = await asyncio.gather(run(engine, with_lp), run(engine, without))
    ids, entries = entries_of(chunks)
    expected = reference(engine.render(with_lp).ids, ids)
    assert [e.logprob for e in entries] == pytest.approx([float(expected[j, t]) for j, t in enumerate(ids)], abs=2e-3)


async def test_the_simulated_engine_refuses_logprobs_as_unsupported():
    eng = backend_class("simulated")(model_id="m")
    await eng.start()
    with pytest.raises(BusError) as info:
        await run(eng, chat(logprobs=0))
    assert (info.value.code, info.value.param) == ("unsupported", "logprobs")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm (the [vllm] extra)")
async def test_vllm_sample_logprobs_map_to_ours():
    from vllm.logprobs import FlatLogprobs, Logprob

    from services.engine.backends.vllm import token_logprobs, vllm_sampling

    assert vllm_sampling(SamplingParams(logprobs=3), 8).logprobs == 3
    assert vllm_sampling(SamplingParams(), 8).logprobs is None
    # Token 7 sampled outside the top 2 (rank 4); token 9 sampled as the best one.
    positions = [
        {7: Logprob(-2.5, 4, " c"), 1: Logprob(-0.5, 1, " a"), 2: Logprob(-1.0, 2, " b")},
        {9: Logprob(-0.1, 1, "!"), 3: Logprob(-3.0, 2, None)},
    ]
    flat = FlatLogprobs()
    for p in positions:
        flat.append(p)
    for given in (positions, flat):
        out = token_logprobs([7, 9], given, 2, lambda token: f"<{token}>")
        assert [(e.token_id, e.token, e.logprob) for e in out] == [(7, " c", -2.5), (9, "!", -0.1)]
        assert [(t.token_id, t.token, t.logprob) for t in out[0].top] == [(1, " a", -0.5), (2, " b", -1.0)]
        assert [(t.token_id, t.token) for t in out[1].top] == [(9, "!"), (3, "<3>")]  # undecoded: our tokenizer
    missing = token_logprobs([5], [None], 0, str)[0]  # a position vLLM left empty
    assert missing.token == "5" and math.isnan(missing.logprob)
