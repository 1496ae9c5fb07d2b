"""Priority under saturation and an engine killed with SIGKILL: real processes, real model."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import aiohttp
import msgspec
import nats
import pytest

from infra import provision
from schemas import names
from schemas.heartbeat import EngineHeartbeat
from services.cli.readiness import wait_until_ready
from services.cli.supervisor import ChildSpec, Supervisor
from services.common.natsserver import NatsServer
from tests.support import REPO, free_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "smol"


class Cluster:
    """nats-server, one scheduler, one edge and any number of engines, each its own process."""

    def __init__(self, tmp, model_dir) -> None:
        self.tmp, self.model_dir = tmp, model_dir
        self.server = NatsServer(tmp / "nats", log_file=tmp / "nats.log")
        self.sup = Supervisor(tmp / "logs", cwd=REPO, console=None, report=lambda _m: None, stop_timeout=10)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    async def start(self, engines: dict[str, int]) -> None:
        self.server.start()
        nc = await nats.connect(self.server.url)
        await provision.apply(nc.jetstream())
        await nc.close()
        py, url = sys.executable, self.server.url
        for worker, slots in engines.items():
            await self.sup.start(ChildSpec(worker, (py, "-m", "services.engine", "--nats-url", url, "--model-path",
                                                    str(self.model_dir), "--model-id", MODEL, "--worker-id", worker,
                                                    "--slots", str(slots))))
        await self.sup.start(ChildSpec("scheduler", (py, "-m", "services.scheduler", "--nats-url", url)))
        await self.sup.start(ChildSpec("edge", (py, "-m", "services.edge", "--nats-url", url, "--port",
                                                str(self.port))))
        await wait_until_ready(self.url, [MODEL], timeout=120)
        # Every engine must be heart-beating before the test starts loading them.
        nc = await nats.connect(self.server.url)
        seen: set[str] = set()

        async def on_status(msg):
            seen.add(msgspec.json.decode(msg.data, type=EngineHeartbeat).worker)

        await nc.subscribe(names.WORKER_STATUS_ALL, cb=on_status)

        async def all_seen():
            return seen >= set(engines)

        assert await wait_for(all_seen, timeout=60)
        await nc.close()

    async def stop(self) -> None:
        await self.sup.stop_all(["edge", "scheduler"])
        self.server.stop()


async def chat(http: aiohttp.ClientSession, url: str, content: str, max_tokens: int, **extra) -> dict:
    body = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": content}], **extra}
    async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
        return {"status": resp.status, "body": await resp.json(), "done": time.monotonic()}


async def busy_engines(nats_url: str, workers: set[str], timeout: float) -> bool:
    """Wait until every engine in ``workers`` reports a request in flight."""
    nc = await nats.connect(nats_url)
    busy: set[str] = set()

    async def on_status(msg):
        hb = msgspec.json.decode(msg.data, type=EngineHeartbeat)
        if hb.in_flight:
            busy.add(hb.worker)

    await nc.subscribe(names.WORKER_STATUS_ALL, cb=on_status)

    async def all_busy():
        return busy >= workers

    try:
        return await wait_for(all_busy, timeout=timeout)
    finally:
        await nc.close()


async def queued(url: str, lane: str, count: int, timeout: float) -> bool:
    """Wait until ``count`` requests are in ``lane`` of the inference queue (waiting, or held un-acked by a
    scheduler that has no free engine for them)."""
    nc = await nats.connect(url)
    js = nc.jetstream()

    async def enough():
        info = await js.consumer_info(names.INFER_STREAM, names.scheduler_durable(lane))
        return info.num_pending + info.num_ack_pending >= count

    try:
        return await wait_for(enough, timeout=timeout)
    finally:
        await nc.close()


async def test_high_priority_request_overtakes_queued_low_priority_ones(tmp_path, default_model_dir):
    cluster = Cluster(tmp_path, default_model_dir)
    await cluster.start({"solo": 1})
    try:
        async with aiohttp.ClientSession() as http:
            blocker = asyncio.create_task(chat(http, cluster.url, "Write a long story about a dragon.", 60))
            assert await busy_engines(cluster.server.url, {"solo"}, timeout=60)  # its only slot is taken
            lows = [asyncio.create_task(chat(http, cluster.url, f"Count to {i + 3}.", 12, priority=-1))
                    for i in range(3)]
            assert await queued(cluster.server.url, "low", 3, timeout=60)  # all three wait in the low lane
            high = asyncio.create_task(chat(http, cluster.url, "Say yes.", 4, priority=5))
            results = await asyncio.wait_for(asyncio.gather(blocker, high, *lows), timeout=240)
        assert all(r["status"] == 200 for r in results), results
        high_done = results[1]["done"]
        assert all(high_done < low["done"] for low in results[2:]), "the high-priority request waited behind lows"
    finally:
        await cluster.stop()
        await cluster.sup.stop_all(["solo"])


@pytest.mark.timeout(600)
async def test_sigkilled_engine_its_requests_migrate_and_it_gets_no_new_work(tmp_path, default_model_dir):
    cluster = Cluster(tmp_path, default_model_dir)
    await cluster.start({"eng-a": 2, "eng-b": 2})
    prompts = [f"Write a long poem number {i}." for i in range(4)]
    try:
        async with aiohttp.ClientSession() as http:
            # The uninterrupted greedy answers first, generated the same way (never from the prompt cache).
            uninterrupted = await asyncio.gather(*[chat(http, cluster.url, p, 48, cache=False) for p in prompts])
            assert all(r["status"] == 200 for r in uninterrupted), uninterrupted
            streams = [asyncio.create_task(chat(http, cluster.url, p, 48, cache=False)) for p in prompts]
            assert await busy_engines(cluster.server.url, {"eng-a", "eng-b"}, timeout=120)
            os.kill(cluster.sup.children["eng-a"].proc.pid, signal.SIGKILL)
            results = await asyncio.wait_for(asyncio.gather(*streams), timeout=280)
            # The requests on the killed engine continued on eng-b (migrated): every client has the answer it
            # would have had without the kill, token for token (greedy), billed once.
            for r, whole in zip(results, uninterrupted):
                assert r["status"] == 200, r
                assert r["body"]["choices"][0]["message"]["content"] == whole["body"]["choices"][0]["message"]["content"]
                assert r["body"]["usage"]["completion_tokens"] == whole["body"]["usage"]["completion_tokens"]
            async with http.get(f"{cluster.url}/metrics") as resp:
                failovers = await resp.text()
            assert "llm_edge_failovers_total{" in failovers, "no request was running on the killed engine"
            # New requests all go to the surviving engine and succeed.
            again = await asyncio.gather(*[chat(http, cluster.url, "Say hi.", 4) for _ in range(4)])
            assert all(r["status"] == 200 for r in again), again
    finally:
        await cluster.stop()
        await cluster.sup.stop_all(["eng-b", "eng-a"])
