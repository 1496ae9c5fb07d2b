"""Prompt-cache hits through the scheduler: one joined delta when not streamed, repeated hits from memory."""

from __future__ import annotations

import msgspec

from schemas.events import StreamEnd, StreamStart, TokenDelta
from services.common.buckets import kv_keys
from tests.scheduler.test_scheduler_cache import ask, chat, engine, until_entries  # noqa: F401
from tests.scheduler.test_scheduler_harness import count, eventually, start_scheduler  # noqa: F401


async def test_a_hit_not_streamed_is_one_delta_with_the_whole_text(nc, js, start_scheduler, engine):
    async with start_scheduler() as scheduler:
        await eventually(lambda: scheduler.table.get(engine) is not None, what="the engine's heartbeat")
        first = await ask(nc, chat(max_tokens=6))
        await until_entries(js, 1, "the engine never stored the response")
        plain = chat(max_tokens=6)
        plain = msgspec.structs.replace(plain, stream=False)
        again = await ask(nc, plain)
        streamed = await ask(nc, chat(max_tokens=6))
        assert count(scheduler, "cached") == 2
    deltas = [e for e in first if type(e) is TokenDelta]
    assert len(deltas) == 6
    assert [type(e) for e in again] == [StreamStart, TokenDelta, StreamEnd]
    assert again[1].seq == 1 and again[2].seq == 2
    assert again[1].text == "".join(d.text for d in deltas) == "tok1 tok2 tok3 tok4 tok5 tok6 "
    assert again[1].token_ids == [t for d in deltas for t in d.token_ids]
    assert again[2].cached and again[2].usage == first[-1].usage and again[2].finish_reason == "length"
    # A streamed hit still gets the original deltas one by one.
    assert [(e.seq, e.text) for e in streamed if type(e) is TokenDelta] == [(d.seq, d.text) for d in deltas]


async def test_a_repeated_hit_is_served_from_memory_until_the_entry_is_deleted(nc, js, start_scheduler, engine):
    async with start_scheduler(cache_mirror_check=0.1) as scheduler:
        await eventually(lambda: scheduler.table.get(engine) is not None, what="the engine's heartbeat")
        first = await ask(nc, chat())
        await until_entries(js, 1, "the engine never stored the response")
        hits = [await ask(nc, chat()) for _ in range(3)]
        assert all(h[0].worker == "cache" for h in hits)
        sample = scheduler.metrics.registry.get_sample_value
        assert sample("llm_scheduler_cache_hits_total") == 3
        assert sample("llm_scheduler_cache_local_hits_total") == 2  # the first hit read KV, the next two did not
        kv = await js.key_value("llm_prompt_cache")
        [key] = await kv_keys(kv)
        await kv.delete(key)
        mirror = scheduler.prompt_cache.mirror
        await eventually(lambda: mirror.get(key) is None, what="the watch to deliver the delete")
        again = await ask(nc, chat())
        assert again[0].worker == engine, "a deleted entry was still served from memory"
        assert [e.text for e in again if type(e) is TokenDelta] == [e.text for e in first if type(e) is TokenDelta]
