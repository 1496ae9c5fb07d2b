"""The llama.cpp engine beyond the shared contract: sampling parameters, adapters, failover, the bus.

The shared behaviour (streaming, stop, seeds, abort, usage) is in ``test_engine_contract.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid

import msgspec
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from schemas import names
from schemas.events import StreamEnd, StreamStart, TokenDelta, decode_event, encode
from schemas.heartbeat import EngineHeartbeat
from schemas.inference import ChatMessage, DispatchReply, InferenceRequest, SamplingParams
from services.common.model_store import DEFAULT_MODEL_ID, default_model_gguf
from services.engine.__main__ import build_backend
from services.engine.backend import Chunk, Finished
from services.engine.backends import backend_class
from services.engine.config import parse_args
from services.engine.metrics import EngineMetrics
from services.engine.service import EngineService
from services.engine.text.detok import ByteDetokenizer

pytest.importorskip("llama_cpp", reason="the llama.cpp engine needs the [llamacpp] extra")
pytestmark = [pytest.mark.slow]

STORY = "Write a long story about a brave cat."


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine():
    eng = backend_class("llamacpp")(model_path=default_model_gguf(), model_id="m", slots=8)
    await eng.start()
    yield eng
    await eng.close()


def chat(content: str = STORY, adapter: str | None = None, continuation: str = "", **sampling) -> InferenceRequest:
    sampling.setdefault("temperature", 0.0)
    return InferenceRequest(id=f"l-{uuid.uuid4().hex[:12]}", model="m", reply_to="unused", adapter=adapter,
                            continuation=continuation, messages=[ChatMessage(role="user", content=content)],
                            sampling=SamplingParams(**sampling))


async def run(engine, req, first: asyncio.Event | None = None) -> tuple[str, Finished]:
    """The text and ``Finished`` of ``req``; ``first`` is set once its first chunk arrived (it is running)."""
    text, fin = "", None
    async for ev in engine.generate(req):
        if isinstance(ev, Chunk):
            text += ev.text
            if first is not None:
                first.set()
        else:
            fin = ev
    return text, fin


@pytest.mark.asyncio(loop_scope="module")
async def test_sampling_parameters_change_what_is_sampled(engine):
    greedy, _ = await run(engine, chat(max_tokens=24))
    # top_k=1 leaves only the most likely token, so sampling at any temperature is greedy.
    top1, _ = await run(engine, chat(max_tokens=24, temperature=1.5, top_k=1, seed=7))
    assert top1 == greedy
    # A strong repetition penalty forbids reusing tokens, so the greedy text must change.
    penalised, _ = await run(engine, chat(max_tokens=24, repetition_penalty=3.0))
    assert penalised != greedy
    # Different seeds draw different texts at a high temperature.
    drawn = {(await run(engine, chat(max_tokens=16, temperature=1.5, seed=s)))[0] for s in (1, 2, 3)}
    assert len(drawn) > 1


@pytest.mark.asyncio(loop_scope="module")
async def test_eight_seeded_requests_in_one_batch_match_each_run_alone(engine):
    reqs = [dict(content=f"Tell me a fact about the number {i}.", max_tokens=16, temperature=0.9, seed=100 + i)
            for i in range(8)]
    alone = [await run(engine, chat(**r)) for r in reqs]
    together = await asyncio.gather(*[run(engine, chat(**r)) for r in reqs])
    assert [t for t, _ in together] == [t for t, _ in alone]
    assert all(f.completion_tokens == a.completion_tokens for (_, f), (_, a) in zip(together, alone))


@pytest.mark.asyncio(loop_scope="module")
async def test_requests_joining_and_leaving_a_running_batch_match_each_run_alone(engine):
    # Different lengths and staggered arrivals: sequences end out of order, leave gaps in the sequence
    # ids that later requests fill, and every step mixes runs of ids (llama.cpp splits those into
    # micro-batches); each answer must still be exactly the one it gets alone.
    reqs = [dict(content=f"Describe the colour number {i} in a few words.", max_tokens=4 + 5 * (i % 4))
            for i in range(12)]
    alone = [await run(engine, chat(**r)) for r in reqs]

    # Each request starts once the one before it has its first token: it joins a batch that is running.
    running = [asyncio.Event() for _ in reqs]

    async def later(i: int, r: dict):
        if i:
            await running[i - 1].wait()
        return await run(engine, chat(**r), running[i])

    mixed = await asyncio.gather(*[later(i, r) for i, r in enumerate(reqs)])
    assert [t for t, _ in mixed] == [t for t, _ in alone]
    assert [f.completion_tokens for _, f in mixed] == [f.completion_tokens for _, f in alone]


@pytest.mark.asyncio(loop_scope="module")
async def test_a_prompt_sharing_a_prefix_with_a_finished_one_reuses_its_kv(engine):
    first, _ = await run(engine, chat("Name a color.", max_tokens=8))
    before = engine.prefix_cache_stats().reused_tokens
    again, fin = await run(engine, chat("Name a color.", max_tokens=8))  # all but the last prompt token kept
    prompt = engine.render(chat("Name a color.")).ids
    assert again == first
    assert engine.prefix_cache_stats().reused_tokens - before == len(prompt) - 1
    assert (fin.prompt_tokens, fin.cached_tokens) == (len(prompt), len(prompt) - 1)  # reported in usage
    # A different question still shares the chat template's system turn.
    before = engine.prefix_cache_stats().reused_tokens
    await run(engine, chat("Name a fruit.", max_tokens=4))
    assert engine.prefix_cache_stats().reused_tokens - before >= 10


@pytest.mark.asyncio(loop_scope="module")
async def test_a_prompt_whose_stream_was_reused_comes_back_from_its_saved_copy(engine):
    """One request at a time all take the lowest stream, so a prompt sharing only the template's header
    cuts the one before; that one's KV was saved to host memory and comes back whole, same tokens."""
    a, b = chat("Name a planet of the solar system.", max_tokens=8), chat("Name a river in Europe.", max_tokens=8)
    first, _ = await run(engine, a)
    await run(engine, b)  # shares only the header with ``a``: ``a``'s stream is the lowest with the most
    saved = engine._batcher.saved
    restored, stats = saved.restored, engine.prefix_cache_stats()
    again, fin = await run(engine, a)

    n = len(engine.render(a).ids)
    assert again == first
    assert fin.cached_tokens == n - 1  # all but the last prompt token, whose logits the first sample needs
    assert saved.restored == restored + 1
    after = engine.prefix_cache_stats()
    assert after.hits == stats.hits + 1 and after.reused_tokens == stats.reused_tokens + n - 1
    assert after.nbytes > 0


@pytest.mark.asyncio(loop_scope="module")
async def test_with_no_bytes_for_saved_prefixes_a_cut_stream_is_prefilled_again():
    eng = backend_class("llamacpp")(model_path=default_model_gguf(), model_id="m", slots=2, prefix_cache_bytes=0)
    await eng.start()
    try:
        a, b = chat("Name a planet of the solar system.", max_tokens=4), chat("Name a river in Europe.", max_tokens=4)
        first, _ = await run(eng, a)
        await run(eng, b)
        again, fin = await run(eng, a)
        assert again == first
        assert 0 < fin.cached_tokens < len(eng.render(a).ids) - 1  # the header only, from the stream
        assert eng._batcher.saved.restored == 0 and eng.prefix_cache_stats().nbytes == 0
    finally:
        await eng.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_logprobs_are_llama_cpps_own_log_softmax(engine):
    import llama_cpp

    prompt = "The capital of France is"
    req = InferenceRequest(id=f"l-{uuid.uuid4().hex[:12]}", model="m", reply_to="unused", prompt=prompt,
                           sampling=SamplingParams(max_tokens=6, temperature=0.0, logprobs=3))
    chunks = [ev async for ev in engine.generate(req) if isinstance(ev, Chunk)]
    ids = [t for c in chunks for t in c.token_ids]
    entries = [e for c in chunks for e in (c.logprobs or [])]
    assert ids and [e.token_id for e in entries] == ids
    for e in entries:  # greedy: the sampled token is the most likely one; alternatives best first
        assert len(e.top) == 3 and e.top[0].token_id == e.token_id and e.logprob == e.top[0].logprob
        assert [t.logprob for t in e.top] == sorted((t.logprob for t in e.top), reverse=True)
        assert e.logprob <= 0.0 and e.token == engine.model.decode([e.token_id])
        assert sum(math.exp(t.logprob) for t in e.top) <= 1.0 + 1e-9  # normalised over the whole vocabulary
    # llama-cpp-python's own completion API on the same GGUF, with its own context settings: the same
    # tokens, log-probabilities within 0.2 (this Q4_1 model's logits move by ~0.1 with the KV layout and
    # the attention kernel; a missing normalisation or a wrong row would be off by whole units).
    ref = llama_cpp.Llama(str(default_model_gguf()), n_ctx=512, logits_all=True, verbose=False)
    try:
        out = ref.create_completion(prompt, max_tokens=6, temperature=0.0, logprobs=3)["choices"][0]["logprobs"]
    finally:
        ref.close()
    assert "".join(out["tokens"]) == "".join(engine.model.decode([t]) for t in ids)
    assert [e.logprob for e in entries] == pytest.approx(out["token_logprobs"], abs=0.2)


@pytest.mark.asyncio(loop_scope="module")
async def test_a_continuation_carries_on_the_answer_and_bills_only_the_prompt(engine):
    full, whole = await run(engine, chat(max_tokens=20))
    head = full[: full.rindex(" ", 0, len(full) // 2)]  # at a word boundary, so it tokenizes as generated
    rest, fin = await run(engine, chat(max_tokens=20, continuation=head))
    assert fin.prompt_tokens == whole.prompt_tokens
    assert (head + rest).startswith(full[: len(head) + 8])


@pytest.mark.asyncio
async def test_the_engine_service_serves_the_default_gguf_on_the_bus(nc, nats_server):
    worker = f"w-{uuid.uuid4().hex[:8]}"
    cfg = parse_args(["--nats-url", nats_server.url, "--engine", "llamacpp", "--model-id", DEFAULT_MODEL_ID,
                      "--worker-id", worker, "--heartbeat-interval", "0.2", "--slots", "2", "--threads", "1"])
    backend = build_backend(cfg)
    service = EngineService(cfg, backend, EngineMetrics(CollectorRegistry()))
    beats = await nc.subscribe(names.WORKER_STATUS_ALL)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        hb = msgspec.json.decode((await beats.next_msg(timeout=60)).data, type=EngineHeartbeat)
        assert (hb.engine, hb.device, hb.slots) == ("llama.cpp", "cpu", 2)
        assert hb.models[0].id == DEFAULT_MODEL_ID and hb.models[0].context_length == 8192
        assert backend.model.shape.threads == 1  # --threads reaches llama.cpp's context
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        req = InferenceRequest(id=f"r-{uuid.uuid4().hex[:10]}", model=DEFAULT_MODEL_ID, reply_to=inbox,
                               messages=[ChatMessage(role="user", content="Name a color.")],
                               sampling=SamplingParams(max_tokens=8, temperature=0.0))
        msg = await nc.request(names.engine_generate(worker), encode(req), timeout=5)
        assert msgspec.json.decode(msg.data, type=DispatchReply).accepted
        events = []
        while not events or not isinstance(events[-1], StreamEnd):
            events.append(decode_event((await sub.next_msg(timeout=30)).data))
        assert isinstance(events[0], StreamStart)
        deltas = [e for e in events if isinstance(e, TokenDelta)]
        assert deltas and "".join(d.text for d in deltas).strip()
        assert events[-1].usage.completion_tokens <= 8 and events[-1].usage.prompt_tokens > 5
    finally:
        stop.set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(task, 30)


@pytest.mark.asyncio(loop_scope="module")
async def test_the_byte_detokenizer_streams_whole_characters_only(engine):
    model = engine.model
    text = "Grüße, 世界! 🚀 done"
    ids = model.tokenize(text, add_special=False, parse_special=False)
    detok = ByteDetokenizer(model.piece)
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) == model.decode(ids) == text
    assert "" in pieces  # some characters' bytes span tokens: they were held back, not split
    assert all("\ufffd" not in p for p in pieces)
    # A byte that cannot start a character is replaced at once, as decoding the whole text does.
    stray = next(t for t in range(model.n_vocab) if model.piece(t) == b"\x80")
    ids = [stray, *model.tokenize(" ok", add_special=False, parse_special=False)]
    detok = ByteDetokenizer(model.piece)
    assert [detok.push(i) for i in ids][0] == "\ufffd"
    assert model.decode(ids) == "\ufffd ok"


def test_threads_must_not_be_negative(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--engine", "llamacpp", "--model-id", "m", "--threads", "-1"])
    assert "--threads" in capsys.readouterr().err


def test_pin_threads_takes_auto_on_or_off(capsys):
    assert parse_args(["--engine", "llamacpp", "--model-id", "m"]).pin_threads == "auto"
    assert parse_args(["--engine", "llamacpp", "--model-id", "m", "--pin-threads", "off"]).pin_threads == "off"
    with pytest.raises(SystemExit):
        parse_args(["--engine", "llamacpp", "--model-id", "m", "--pin-threads", "sometimes"])
    assert "--pin-threads" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--engine", "transformers", "--model-id", "m", "--pin-threads", "on"])
    assert "--pin-threads is a llama.cpp setting" in capsys.readouterr().err
    assert parse_args(["--engine", "auto", "--model-id", "m", "--pin-threads", "off"]).pin_threads == "off"


def test_the_llama_cpp_engine_process_does_not_load_torch():
    """Its resident memory next to llama-server's: torch alone is about 180 MiB the engine never uses."""
    import subprocess
    import sys

    code = ("import sys\nfrom services.engine.backends import backend_class\nimport services.engine.service\n"
            "backend_class('llamacpp')\nimport services.engine.grammar.compiler\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
