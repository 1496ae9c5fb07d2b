"""The prompt cache on a real nats-server: a real engine (simulated backend) fills it, the scheduler replays hits."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from schemas import names
from schemas.events import StreamEnd, StreamError, StreamStart, TokenDelta
from schemas.inference import ChatMessage, InferenceRequest, SamplingParams
from services.common.buckets import kv_values
from tests.engine.test_engine_service import running_engine
from tests.scheduler.test_scheduler_harness import (ReplyInbox, count, engines, eventually, known, new_request,  # noqa: F401
                                          start_scheduler, submit)


def chat(*, model: str = "sim", **sampling) -> InferenceRequest:
    """A chat request for the simulated engine; ``ask`` gives it its reply subject."""
    sampling.setdefault("max_tokens", 5)
    sampling.setdefault("temperature", 0.0)
    cache = sampling.pop("cache", True)
    rid = f"r-{uuid.uuid4().hex[:10]}"
    return InferenceRequest(id=rid, model=model, reply_to="unset", created=time.time(), cache=cache,
                            messages=[ChatMessage(role="user", content="one two three")],
                            sampling=SamplingParams(**sampling))


async def ask(nc, req: InferenceRequest) -> list:
    """Submit ``req`` with its own inbox and return its whole event stream."""
    async with ReplyInbox(nc) as inbox:
        req.reply_to = inbox.subject
        await submit(nc, req)
        await eventually(lambda: inbox.events and isinstance(inbox.events[-1], (StreamEnd, StreamError)),
                         timeout=5.0, what=f"the end of {req.id}'s stream")
        return list(inbox.events)


async def until_entries(js, expected: int, what: str) -> None:
    """Wait until the prompt-cache bucket holds ``expected`` entries (engines write in the background)."""
    deadline = time.monotonic() + 3
    while await cache_entries(js) != expected:
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def cache_entries(js) -> int:
    return len(await kv_values(await js.key_value(names.PROMPT_CACHE_BUCKET)))


def accepted(scheduler) -> float:
    return scheduler.metrics.registry.get_sample_value("llm_scheduler_dispatch_attempts_total",
                                                       {"result": "accepted"}) or 0.0


def shape(events: list) -> list[tuple]:
    """What a client sees of a stream, without ids, the worker and the cached flag."""
    out = []
    for e in events:
        match e:
            case StreamStart():
                out.append(("start", e.model))
            case TokenDelta():
                out.append(("delta", e.seq, e.text, tuple(e.token_ids)))
            case StreamEnd():
                out.append(("end", e.seq, e.finish_reason, e.usage.prompt_tokens, e.usage.completion_tokens))
            case _:
                out.append(("error", e.code))
    return out


@pytest.fixture
async def engine(nats_server):
    async with running_engine(nats_server.url) as (service, worker):
        yield worker


async def test_a_hit_is_replayed_without_any_engine_dispatch(nc, js, nats_server, start_scheduler, engine):
    async with start_scheduler() as scheduler:
        await eventually(lambda: scheduler.table.get(engine) is not None, what="the engine's heartbeat")
        first = await ask(nc, chat())
        assert first[0].worker == engine and not first[-1].cached
        await until_entries(js, 1, "the engine never stored the response")
        dispatched = accepted(scheduler)
        again = await ask(nc, chat(model="sim-alias"))  # an alias of the same model: the same entry
        assert isinstance(again[0], StreamStart) and again[0].worker == "cache"
        assert [type(e) for e in again] == [type(e) for e in first]
        assert shape(again) == shape(first)
        assert again[-1].cached is True and again[-1].usage == first[-1].usage
        assert all(e.id == again[0].id for e in again)
        assert accepted(scheduler) == dispatched  # no engine was asked
        assert count(scheduler, "cached") == 1
        sample = scheduler.metrics.registry.get_sample_value
        assert (sample("llm_scheduler_cache_hits_total"), sample("llm_scheduler_cache_misses_total")) == (1, 1)
        assert sample("llm_scheduler_cache_hit_ratio") == 0.5


async def test_requests_differing_only_in_max_tokens_or_stop_never_share_an_entry(nc, js, start_scheduler,
                                                                                   engine):
    async with start_scheduler() as scheduler:
        await eventually(lambda: scheduler.table.get(engine) is not None, what="the engine's heartbeat")
        variants = [dict(max_tokens=5), dict(max_tokens=4), dict(max_tokens=5, stop=["tok3"])]
        firsts = []
        for n, sampling in enumerate(variants, start=1):
            events = await ask(nc, chat(**sampling))
            assert events[0].worker == engine, f"variant {sampling} was answered from another's entry"
            firsts.append(events)
            await until_entries(js, n, f"variant {sampling} was not stored under its own key")
        texts = ["".join(e.text for e in events if isinstance(e, TokenDelta)) for events in firsts]
        assert texts == ["tok1 tok2 tok3 tok4 tok5 ", "tok1 tok2 tok3 tok4 ", "tok1 tok2 "]
        for sampling, events in zip(variants, firsts, strict=True):
            hit = await ask(nc, chat(**sampling))
            assert hit[0].worker == "cache" and shape(hit) == shape(events)
        assert count(scheduler, "cached") == 3


@pytest.mark.parametrize("sampling", [dict(temperature=0.7), dict(temperature=0.0, cache=False)],
                         ids=["non-deterministic", "opted-out"])
async def test_uncacheable_requests_always_reach_an_engine_and_are_never_stored(nc, js, start_scheduler, engine,
                                                                               sampling):
    async with start_scheduler() as scheduler:
        await eventually(lambda: scheduler.table.get(engine) is not None, what="the engine's heartbeat")
        for _ in range(2):
            events = await ask(nc, chat(**sampling))
            assert events[0].worker == engine and not events[-1].cached
        # A cacheable request after them is stored: the engine's background writes have landed, and only this one.
        await ask(nc, chat(max_tokens=3))
        await until_entries(js, 1, "the cacheable request was not stored")
        assert await cache_entries(js) == 1
        assert accepted(scheduler) == 3
        sample = scheduler.metrics.registry.get_sample_value
        assert (sample("llm_scheduler_cache_hits_total"), sample("llm_scheduler_cache_misses_total")) == (0, 1)


async def test_an_opt_out_is_not_answered_from_an_existing_entry(nc, js, start_scheduler, engine):
    async with start_scheduler() as scheduler:
        await eventually(lambda: scheduler.table.get(engine) is not None, what="the engine's heartbeat")
        await ask(nc, chat())
        await until_entries(js, 1, "the engine never stored the response")
        events = await ask(nc, chat(cache=False))
        assert events[0].worker == engine and not events[-1].cached
        assert accepted(scheduler) == 2


async def test_cache_disabled_in_config_always_dispatches(nc, js, start_scheduler, engines):
    double = await engines("e", slots=4)
    async with start_scheduler(cache_enabled=False) as scheduler:
        await known(scheduler, double)
        req = await submit(nc, new_request(sampling=SamplingParams(temperature=0.0)))
        await eventually(lambda: double.received_ids == [req.id], what="the dispatch")
        assert double.received[0].cache_key is None
        assert scheduler.metrics.registry.get_sample_value("llm_scheduler_cache_misses_total") == 0


async def test_a_cacheable_miss_carries_its_key_to_the_engine(nc, start_scheduler, engines):
    double = await engines("e", slots=4)
    async with start_scheduler() as scheduler:
        await known(scheduler, double)
        cacheable = await submit(nc, new_request(sampling=SamplingParams(temperature=0.0)))
        sampled = await submit(nc, new_request(sampling=SamplingParams(temperature=0.9)))
        await eventually(lambda: len(double.received) == 2, what="both dispatches")
        keys = {r.id: r.cache_key for r in double.received}
        assert keys[sampled.id] is None
        assert keys[cacheable.id] is not None and len(keys[cacheable.id]) == 64
