"""The prompt-cache mirror: pure rules, then on a real nats-server (deletes, new values, purges, TTL)."""

from __future__ import annotations

import asyncio
import time
import uuid

from nats.js.api import KeyValueConfig

from schemas.cache import CachedDelta, CachedResponse
from schemas.events import Usage, encode
from services.common.cache_mirror import CacheMirror
from services.scheduler.prompt_cache import PromptCache
from tests.scheduler.test_scheduler_harness import eventually


def response(text: str) -> CachedResponse:
    return CachedResponse(model="m", deltas=[CachedDelta(text=text)], finish_reason="stop",
                          usage=Usage(prompt_tokens=1, completion_tokens=1))


def read(mirror: CacheMirror, key: str, revision: int, size: int = 10, text: str = "a") -> None:
    mirror.begin_read(key)
    mirror.end_read(key, revision, size, response(text))


def test_a_read_entry_is_served_until_its_key_changes():
    mirror = CacheMirror(1000)
    assert mirror.get("k") is None
    read(mirror, "k", 5)
    assert mirror.get("k").deltas[0].text == "a"
    mirror.changed("k", 5)  # the watch delivering the put that was read: nothing newer
    assert mirror.get("k") is not None
    mirror.changed("k", 6)
    assert mirror.get("k") is None and mirror.bytes == 0


def test_a_change_during_the_read_keeps_the_result_out():
    mirror = CacheMirror(1000)
    mirror.begin_read("k")
    mirror.begin_read("k")  # two concurrent lookups of one key
    mirror.changed("k", 6)
    mirror.end_read("k", 5, 10, response("old"))  # the read returned revision 5: it missed change 6
    mirror.end_read("k", 5, 10, response("old"))
    assert mirror.get("k") is None
    mirror.begin_read("k")
    mirror.changed("k", 7)  # seen during the read, but the read returned it (revision 7): kept
    mirror.end_read("k", 7, 10, response("seven"))
    assert mirror.get("k").deltas[0].text == "seven"
    read(mirror, "k", 8, text="new")  # a read after the change is kept
    assert mirror.get("k").deltas[0].text == "new"


def test_absent_entries_are_not_kept_and_the_byte_bound_evicts_the_least_recent():
    mirror = CacheMirror(25)
    mirror.begin_read("gone")
    mirror.end_read("gone", None, 0, None)
    assert len(mirror) == 0
    read(mirror, "a", 1)
    read(mirror, "b", 2)
    assert mirror.get("a") is not None  # a is now the most recent
    read(mirror, "c", 3)
    assert (mirror.get("a") is not None, mirror.get("b"), mirror.get("c") is not None) == (True, None, True)
    assert mirror.bytes == 20
    read(mirror, "huge", 4, size=26)  # larger than the whole bound: never kept
    assert mirror.get("huge") is None and mirror.bytes == 20


def test_entries_older_than_the_buckets_first_sequence_are_dropped():
    mirror = CacheMirror(1000)
    read(mirror, "old", 3)
    read(mirror, "new", 9)
    mirror.expire_before(4)
    assert mirror.get("old") is None and mirror.get("new") is not None
    read(mirror, "older", 2)  # read before the check saw it gone: not kept
    assert mirror.get("older") is None


def test_a_suspended_mirror_serves_nothing_and_keeps_nothing_until_resumed():
    mirror = CacheMirror(1000)
    read(mirror, "k", 5)
    mirror.begin_read("j")
    mirror.suspend()
    assert mirror.get("k") is None
    mirror.end_read("j", 6, 10, response("x"))
    read(mirror, "k", 5)
    assert mirror.get("k") is None
    mirror.resume()
    read(mirror, "k", 5)
    assert mirror.get("k") is not None


async def bucket(js, ttl: float = 0.0):
    name = f"mirror_{uuid.uuid4().hex[:8]}"
    return name, await js.create_key_value(KeyValueConfig(bucket=name, history=1, ttl=ttl or None))


async def until(check, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


async def test_repeated_hits_are_served_from_memory_and_a_delete_or_new_value_is_seen(nc, js):
    name, kv = await bucket(js)
    await kv.put("k1", encode(response("first")))
    async with PromptCache(nc, kv, mirror_bytes=1 << 20, check_interval=0.1, bucket=name) as cache:
        assert (await cache.lookup("k1")).deltas[0].text == "first"
        assert (await cache.lookup("k1")).deltas[0].text == "first"
        assert cache.mirror_hits == 1
        await kv.put("k1", encode(response("second")))

        async def second():
            hit = await cache.lookup("k1")
            return hit is not None and hit.deltas[0].text == "second"
        await until(second)
        await kv.delete("k1")

        async def gone():
            return await cache.lookup("k1") is None
        await until(gone)
        assert len(cache.mirror) == 0


async def test_a_purge_of_the_whole_stream_or_the_ttl_empties_the_mirror_within_a_check(nc, js):
    name, kv = await bucket(js, ttl=1.0)
    await kv.put("k1", encode(response("x")))
    async with PromptCache(nc, kv, mirror_bytes=1 << 20, check_interval=0.1, bucket=name) as cache:
        assert await cache.lookup("k1") is not None
        assert await cache.lookup("k1") is not None and cache.mirror_hits == 1
        await js.purge_stream(f"KV_{name}")  # no per-key markers: only the stream's first sequence moves
        await eventually(lambda: cache.mirror.get("k1") is None, what="a check to notice the purge")
        assert await cache.lookup("k1") is None
        await kv.put("k2", encode(response("y")))
        assert await cache.lookup("k2") is not None
        await eventually(lambda: cache.mirror.get("k2") is not None, what="the watch to deliver the put of k2")
        assert await cache.lookup("k2") is not None and cache.mirror_hits == 2
        # The bucket's TTL (1 s) passes, then the next check notices the entry is gone.
        await eventually(lambda: cache.mirror.get("k2") is None, timeout=5.0, what="a check to notice the expiry")
        assert await cache.lookup("k2") is None
        assert cache.mirror.usable


def test_a_watch_that_fell_behind_the_bucket_suspends_the_mirror_until_it_catches_up():
    cache = PromptCache(None, None, mirror_bytes=1000)  # check() is pure: no bus needed
    read(cache.mirror, "k", 3)
    cache.check(first_seq=1, last_seq=10)  # seqs 4..10 written since the start: the watch has a check to see them
    assert cache.mirror.get("k") is not None
    cache.check(first_seq=1, last_seq=10)  # ... and did not deliver them: changes may have been missed
    assert not cache.mirror.usable and cache.mirror.get("k") is None
    cache._watched_seq = 10  # the watch delivered them after all
    cache.check(first_seq=1, last_seq=10)
    assert cache.mirror.usable
    cache.check(first_seq=16, last_seq=15)  # 11..15 written, then the whole stream purged
    cache.check(first_seq=16, last_seq=15)  # the watch saw none of them, but none is left to miss
    assert cache.mirror.usable
