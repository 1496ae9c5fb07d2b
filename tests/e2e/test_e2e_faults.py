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


async def test_high_priority_request_overtakes_queued_low_priority_ones(tmp_path, default_model_dir):
    cluster = Cluster(tmp_path, default_model_dir)
    await cluster.start({"solo": 1})
    try:
        async with aiohttp.ClientSession() as http:
            blocker = asyncio.create_task(chat(http, cluster.url, "Write a long story about a dragon.", 60))
            assert await busy_engines(cluster.server.url, {"solo"}, timeout=60)  # its only slot is taken
            lows = []
            for i in range(3):
                lows.append(asyncio.create_task(chat(http, cluster.url, f"Count to {i + 3}.", 12, priority=-1)))
                await asyncio.sleep(0.2)
            high = asyncio.create_task(chat(http, cluster.url, "Say yes.", 4, priority=5))
            results = await asyncio.wait_for(asyncio.gather(blocker, high, *lows), timeout=240)
        assert all(r["status"] == 200 for r in results), results
        high_done = results[1]["done"]
        assert all(high_done < low["done"] for low in results[2:]), "the high-priority request waited behind lows"
    finally:
        await cluster.stop()
        await cluster.sup.stop_all(["solo"])


async def test_sigkilled_engine_its_requests_migrate_and_it_gets_no_new_work(tmp_path, default_model_dir):
    cluster = Cluster(tmp_path, default_model_dir)
    await cluster.start({"eng-a": 2, "eng-b": 2})
    try:
        async with aiohttp.ClientSession() as http:
            streams = [asyncio.create_task(chat(http, cluster.url, f"Write a long poem number {i}.", 120))
                       for i in range(4)]
            assert await busy_engines(cluster.server.url, {"eng-a", "eng-b"}, timeout=120)
            os.kill(cluster.sup.children["eng-a"].proc.pid, signal.SIGKILL)
            results = await asyncio.wait_for(asyncio.gather(*streams), timeout=280)
            # The requests on the killed engine continued on eng-b (migrated): every client has a whole answer.
            for r in results:
                assert r["status"] == 200, r
                assert r["body"]["choices"][0]["message"]["content"], r
                assert r["body"]["usage"]["completion_tokens"] <= 120
            # New requests all go to the surviving engine and succeed.
            again = await asyncio.gather(*[chat(http, cluster.url, "Say hi.", 4) for _ in range(4)])
            assert all(r["status"] == 200 for r in again), again
    finally:
        await cluster.stop()
        await cluster.sup.stop_all(["eng-b", "eng-a"])
