"""The reply socket end to end (``services/common/reply_socket.py``): engines on the edge's host send
their events past nats-server, and an engine lost on that path is failed over as on the bus."""

from __future__ import annotations

import asyncio
import os
import signal

import aiohttp
import msgspec
import nats

from schemas import names
from schemas.heartbeat import EngineHeartbeat
from tests.e2e.test_e2e_failover import InboxTap, cluster, expected, stream_chat  # noqa: F401 - fixture


async def test_engines_on_the_edges_host_send_every_event_through_its_socket_and_none_through_nats(cluster):
    await cluster.start({"eng-a": 4, "eng-b": 4}, token_rate=200, reply_socket=True)
    results, tap = await streams_with_tap(cluster, 6)
    for r in results:
        assert r["status"] == 200 and r["error"] is None and r["text"] == expected(8), r
    assert not tap.starts and not tap.deltas  # the bus carried none of the engines' events


async def test_an_engine_told_no_reply_socket_streams_through_nats_to_the_same_edge(cluster):
    await cluster.start({"eng-a": 4}, token_rate=200, reply_socket=True, engine_args=("--no-reply-socket",))
    results, tap = await streams_with_tap(cluster, 3)
    for r in results:
        assert r["status"] == 200 and r["text"] == expected(8), r
    assert len(tap.starts) == 3 and all(seqs == list(range(1, 9)) for seqs in tap.deltas.values())


async def test_an_engine_killed_mid_stream_on_the_socket_path_loses_and_repeats_nothing(cluster):
    await cluster.start({"eng-a": 10, "eng-b": 10}, token_rate=10, reply_socket=True)
    tokens = 30  # 3 s per answer: the kill lands in the middle of every stream
    async with aiohttp.ClientSession() as http:
        started = [asyncio.Event() for _ in range(12)]
        streams = [asyncio.create_task(stream_chat(http, cluster.url, tokens, s)) for s in started]
        await asyncio.wait_for(asyncio.gather(*[s.wait() for s in started]), timeout=30)
        assert await cluster.heartbeating({"eng-a", "eng-b"}, busy=True)
        cluster.kill("eng-a")
        results = await asyncio.wait_for(asyncio.gather(*streams), timeout=60)
        for r in results:
            assert r["status"] == 200 and r["error"] is None, r
            assert r["text"] == expected(tokens) and r["finish"] == "length", r  # nothing lost or repeated
        metrics = await (await http.get(f"{cluster.url}/metrics")).text()
        assert 'llm_edge_failovers_total{outcome="migrated"}' in metrics, metrics


async def test_an_engine_stopped_mid_stream_is_failed_over_and_what_it_writes_after_sigcont_is_dropped(cluster):
    await cluster.start({"eng-a": 4, "eng-b": 4}, token_rate=10, reply_socket=True)
    tokens = 30
    async with aiohttp.ClientSession() as http:
        started = asyncio.Event()
        stream = asyncio.create_task(stream_chat(http, cluster.url, tokens, started))
        await asyncio.wait_for(started.wait(), timeout=30)
        busy = await running_it(cluster.server.url)
        pid = cluster.sup.children[busy].proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            result = await asyncio.wait_for(stream, timeout=60)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert result["status"] == 200 and result["error"] is None, result
        assert result["text"] == expected(tokens) and result["finish"] == "length", result
        await asyncio.sleep(1.0)  # the resumed engine writes what it had for the moved request: dropped
        again = await asyncio.gather(*[stream_chat(http, cluster.url, 3) for _ in range(4)])
        assert all(r["text"] == expected(3) for r in again), again


async def streams_with_tap(sim, n: int) -> tuple[list[dict], InboxTap]:
    """``n`` streaming answers of 8 tokens at once, and what the engines sent on the bus meanwhile."""
    tap = await InboxTap().start(sim.server.url)
    try:
        async with aiohttp.ClientSession() as http:
            return await asyncio.gather(*[stream_chat(http, sim.url, 8) for _ in range(n)]), tap
    finally:
        await tap.close()


async def running_it(url: str) -> str:
    """The engine whose heartbeat shows the one request in flight."""
    nc = await nats.connect(url)
    found: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def on_status(msg):
        hb = msgspec.json.decode(msg.data, type=EngineHeartbeat)
        if hb.in_flight and not found.done():
            found.set_result(hb.worker)

    await nc.subscribe(names.WORKER_STATUS_ALL, cb=on_status)
    try:
        return await asyncio.wait_for(found, timeout=10)
    finally:
        await nc.close()
