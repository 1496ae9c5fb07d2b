"""Whole-bucket reads of KV buckets (``services.common.buckets``) on a real nats-server."""

from __future__ import annotations

import asyncio

from nats.js.api import KeyValueConfig

from services.common.buckets import kv_keys, kv_values


async def test_every_current_value_and_no_deleted_key(js):
    kv = await js.create_key_value(KeyValueConfig(bucket="t_values", history=5))
    for i in range(600):  # more than one fetch batch
        await kv.put(f"k{i:03d}", f"v{i}".encode())
    await kv.put("k001", b"newer")
    await kv.delete("k002")
    await kv.purge("k003")
    values = await kv_values(kv)
    assert len(values) == 598 and values["k001"] == b"newer" and values["k599"] == b"v599"
    assert "k002" not in values and "k003" not in values
    assert (await js.stream_info("KV_t_values")).config.name == "KV_t_values"  # the bucket itself untouched
    assert not (await js.consumers_info("KV_t_values"))  # its reading consumer is gone


async def test_read_right_after_the_writes_and_an_empty_bucket(js):
    """The race that nats-py's watcher-based listing loses: keys put just before the read are there."""
    kv = await js.create_key_value(KeyValueConfig(bucket="t_fresh"))
    assert await kv_values(kv) == {} and await kv_keys(kv) == []
    for round_ in range(20):
        await asyncio.gather(*(kv.put(f"r{round_}-{i}", b"x") for i in range(3)))
        values = await kv_values(kv)
        assert {f"r{round_}-{i}" for i in range(3)} <= values.keys()
    assert len(await kv_keys(kv)) == 60
