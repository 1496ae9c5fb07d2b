"""The contract every engine backend passes: one suite, so every engine answers a client alike.

Run against the real transformers, llama.cpp and vLLM engines on the default model, and against the simulated
engine (which load tests use) so it cannot drift from the real one's behaviour.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import pytest_asyncio
from transformers import AutoTokenizer

from schemas import ChatMessage, InferenceRequest, SamplingParams
from schemas.errors import BusError, ErrorCode
from services.common.model_store import default_model_gguf
from services.engine.backend import Chunk, Finished
from services.engine.backends import backend_class

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["transformers", "simulated", "llamacpp", "vllm"])
async def engine(request, default_model_dir):
    cls = backend_class(request.param)
    if request.param in ("transformers", "vllm"):
        eng = cls(model_path=default_model_dir, model_id="m", slots=4)
    elif request.param == "llamacpp":
        eng = cls(model_path=default_model_gguf(), model_id="m", slots=4)
    else:
        eng = cls(model_id="m", slots=4, token_rate=200)
    await eng.start()
    yield eng
    await eng.close()


def chat(content: str = "Write a long story about a brave cat.", **sampling) -> InferenceRequest:
    sampling.setdefault("temperature", 0.0)
    return InferenceRequest(id=f"t-{uuid.uuid4().hex[:12]}", model="m", reply_to="unused",
                            messages=[ChatMessage(role="user", content=content)],
                            sampling=SamplingParams(**sampling))


async def collect(engine, req):
    """Text, Finished and the arrival time of every chunk (times[0] is the request's start)."""
    chunks, times, fin = [], [time.monotonic()], None
    async for ev in engine.generate(req):
        if isinstance(ev, Chunk):
            chunks.append(ev)
            times.append(time.monotonic())
        else:
            fin = ev
    return "".join(c.text for c in chunks), fin, times


def decode_steps(engine) -> int | None:
    """The engine's own count of decode steps run so far: engines with a model thread count them."""
    batcher = getattr(engine, "_batcher", None)
    return batcher.steps if batcher is not None else None


async def test_streams_tokens_as_they_are_generated(engine):
    # Real streaming: the first chunk reaches the consumer before the engine has produced the last token
    # (a finished text cut into chunks would arrive only once every token exists). Shown by the engine's
    # own counters, not by wall time.
    req = chat(max_tokens=64)
    chunks, fin, steps_at_first = 0, None, None
    try:
        async for ev in engine.generate(req):
            if isinstance(ev, Chunk):
                chunks += 1
                if chunks == 1:
                    steps_at_first = decode_steps(engine)
                    if steps_at_first is None:  # no step counter: stop it here, as a client going away would
                        await engine.abort(req.id)
            else:
                fin = ev
    except BusError as exc:  # an aborted stream may end with ``cancelled`` (vLLM's does)
        assert exc.code == ErrorCode.CANCELLED and steps_at_first is None, exc
    if steps_at_first is not None:
        assert isinstance(fin, Finished) and chunks >= 10, "expected one chunk per token, not one of finished text"
        # Decode steps ran after the first chunk was in the consumer's hands: it had not produced the last token.
        assert decode_steps(engine) > steps_at_first
    else:
        # Stopped after its first chunk, it had not produced the rest: a pre-generated answer would not stop.
        assert fin is None and chunks < 8


async def test_max_tokens_ends_with_length(engine):
    _, fin, _ = await collect(engine, chat(max_tokens=5))
    assert fin.reason == "length" and fin.completion_tokens == 5


async def test_stop_string_is_cut_and_reported(engine):
    full, _, _ = await collect(engine, chat(max_tokens=30))
    words = full.split()
    stop = words[len(words) // 2]
    text, fin, _ = await collect(engine, chat(max_tokens=30, stop=[stop]))
    assert fin.reason == "stop"
    assert stop not in text
    assert full.startswith(text)


async def test_seed_makes_sampling_reproducible(engine):
    a, _, _ = await collect(engine, chat(max_tokens=20, temperature=1.0, seed=1234))
    b, _, _ = await collect(engine, chat(max_tokens=20, temperature=1.0, seed=1234))
    assert a == b


async def test_abort_ends_the_stream_and_frees_the_slot(engine):
    req = chat(max_tokens=400)
    gen = engine.generate(req)
    first = await gen.__anext__()
    assert isinstance(first, Chunk)
    await engine.abort(req.id)
    with pytest.raises((BusError, StopAsyncIteration)) as info:
        while True:
            await asyncio.wait_for(gen.__anext__(), timeout=5)
    if info.type is BusError:
        assert info.value.code == ErrorCode.CANCELLED
    # The engine still serves at full concurrency afterwards.
    results = await asyncio.wait_for(asyncio.gather(*[collect(engine, chat(max_tokens=4)) for _ in range(4)]), 60)
    assert all(fin.completion_tokens == 4 for _, fin, _ in results)


async def test_concurrent_requests_each_get_their_own_answer(engine):
    prompts = ["Name a color.", "What is 2+2?", "Say hello in French.", "Name a fruit."]
    solo = [await collect(engine, chat(p, max_tokens=12)) for p in prompts]
    together = await asyncio.gather(*[collect(engine, chat(p, max_tokens=12)) for p in prompts])
    assert [t[0] for t in together] == [s[0] for s in solo]


async def test_usage_matches_the_tokenizer(engine, default_model_dir):
    req = chat("Tell me about the sea.", max_tokens=16)
    text, fin, _ = await collect(engine, req)
    if engine.name == "simulated":  # its tokens are words by definition
        assert (fin.prompt_tokens, fin.completion_tokens) == (5, len(text.split()))
        return
    # Engines without a Hugging Face tokenizer (llama.cpp reads the GGUF's) are checked against the
    # same model's Hugging Face tokenizer and chat template, which they must agree with.
    tok = getattr(engine, "tokenizer", None) or AutoTokenizer.from_pretrained(default_model_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Tell me about the sea."}],
                                     add_generation_prompt=True, tokenize=True)["input_ids"]
    assert fin.prompt_tokens == len(prompt)
    assert fin.completion_tokens == len(tok.encode(text, add_special_tokens=False))


async def test_context_length_exceeded_is_a_typed_error(engine):
    with pytest.raises(BusError) as info:
        await collect(engine, chat("word " * 9000, max_tokens=4))
    assert info.value.code == ErrorCode.CONTEXT_LENGTH_EXCEEDED
