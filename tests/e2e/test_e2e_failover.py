"""Failover with real processes and SIGKILL: engines lost before the first token and mid-stream,
a scheduler replica lost mid-burst, and Idempotency-Key retries.

The engines are the clearly named simulated engine (``--engine simulated``) with a slow token
rate, so the moment of each kill is controllable; its answers are ``tok1 tok2 ... tokN``, and a
continued answer carries on the numbering, so a migrated response must equal, word for word, the
one an uninterrupted engine gives.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import sys
from collections import Counter

import aiohttp
import msgspec
import nats
import pytest

from infra import provision
from schemas import names
from schemas.events import StreamStart, TokenDelta, decode_event
from schemas.heartbeat import EngineHeartbeat
from services.cli.readiness import wait_until_ready
from services.cli.supervisor import ChildSpec, Supervisor
from services.common.natsserver import NatsServer
from tests.support import REPO, free_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "sim"
PROMPT = "count for me please"  # 4 prompt tokens for the simulated engine


def expected(n: int) -> str:
    """What the simulated engine answers with ``max_tokens=n``."""
    return "".join(f"tok{i} " for i in range(1, n + 1))


class SimCluster:
    """nats-server, scheduler replicas, one edge and simulated engines, each its own process.

    The edge takes every event through NATS unless ``start(reply_socket=True)``: the taps of these
    tests read the engines' events on the bus (the reply socket's own tests are in
    ``test_e2e_reply_socket.py``).
    """

    def __init__(self, tmp) -> None:
        self.server = NatsServer(tmp / "nats", log_file=tmp / "nats.log")
        self.sup = Supervisor(tmp / "logs", cwd=REPO, console=None, report=lambda _m: None, stop_timeout=10)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.engines: list[str] = []
        self.schedulers: list[str] = []

    async def start(self, engines: dict[str, int], *, schedulers: int = 1, token_rate: float = 0.0,
                    ttft: float = 0.0, ack_wait: float | None = None, scheduler_args: tuple[str, ...] = (),
                    reply_socket: bool = False, engine_args: tuple[str, ...] = ()) -> None:
        self.server.start()
        nc = await nats.connect(self.server.url)
        js = nc.jetstream()
        await provision.apply(js)
        if ack_wait is not None:  # redeliver a dead replica's messages quickly
            for lane in names.LANES_BY_PRIORITY:
                info = await js.consumer_info(names.INFER_STREAM, names.scheduler_durable(lane))
                await js.add_consumer(names.INFER_STREAM, dataclasses.replace(info.config, ack_wait=ack_wait))
        await nc.close()
        py, url = sys.executable, self.server.url
        for worker, slots in engines.items():
            await self.sup.start(ChildSpec(worker, (
                py, "-m", "services.engine", "--engine", "simulated", "--nats-url", url, "--model-id", MODEL,
                "--worker-id", worker, "--slots", str(slots), "--heartbeat-interval", "0.3",
                "--sim-token-rate", str(token_rate), "--sim-ttft", str(ttft), *engine_args)))
            self.engines.append(worker)
        for i in range(schedulers):
            name = f"scheduler-{i}"
            await self.sup.start(ChildSpec(name, (py, "-m", "services.scheduler", "--nats-url", url, "--no-cache",
                                                    *scheduler_args)))
            self.schedulers.append(name)
        await self.sup.start(ChildSpec("edge", (py, "-m", "services.edge", "--nats-url", url, "--port",
                                                str(self.port), *(() if reply_socket else ("--no-reply-socket",)))))
        await wait_until_ready(self.url, [MODEL], timeout=60)
        assert await self.heartbeating(set(engines))

    async def heartbeating(self, workers: set[str], busy: bool = False, timeout: float = 30) -> bool:
        """Wait until every engine in ``workers`` heart-beats (with a request in flight, if ``busy``)."""
        nc = await nats.connect(self.server.url)
        seen: set[str] = set()

        async def on_status(msg):
            hb = msgspec.json.decode(msg.data, type=EngineHeartbeat)
            if hb.in_flight or not busy:
                seen.add(hb.worker)

        await nc.subscribe(names.WORKER_STATUS_ALL, cb=on_status)
        try:
            return await wait_for(lambda: asyncio.sleep(0, seen >= workers), timeout=timeout)
        finally:
            await nc.close()

    def kill(self, name: str) -> None:
        """SIGKILL one child."""
        os.kill(self.sup.children[name].proc.pid, signal.SIGKILL)

    async def stop(self) -> None:
        await self.sup.stop_all(["edge", *self.schedulers, *self.engines])
        self.server.stop()


@pytest.fixture
async def cluster(tmp_path):
    c = SimCluster(tmp_path)
    try:
        yield c
    finally:
        await c.stop()


def body(max_tokens: int, **extra) -> dict:
    return {"model": MODEL, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": PROMPT}], **extra}


async def stream_chat(http: aiohttp.ClientSession, url: str, max_tokens: int, started: asyncio.Event | None = None,
                      **extra) -> dict:
    """One streaming chat request: its status, text, usage, finish reason and any error event."""
    payload = body(max_tokens, stream=True, stream_options={"include_usage": True}, **extra)
    out: dict = {"text": "", "usage": None, "finish": None, "error": None}
    async with http.post(f"{url}/v1/chat/completions", json=payload) as resp:
        out["status"] = resp.status
        if resp.status != 200:
            out["error"] = await resp.json()
            return out
        async for line in resp.content:
            data = line.decode().strip()
            if not data.startswith("data: ") or data == "data: [DONE]":
                continue
            chunk = json.loads(data[6:])
            if "error" in chunk:
                out["error"] = chunk
                continue
            if chunk.get("usage"):
                out["usage"] = chunk["usage"]
            for choice in chunk["choices"]:
                out["text"] += choice["delta"].get("content") or ""
                out["finish"] = choice["finish_reason"] or out["finish"]
                if out["text"] and started is not None:
                    started.set()
    return out


async def plain_chat(http: aiohttp.ClientSession, url: str, max_tokens: int, headers: dict | None = None) -> dict:
    async with http.post(f"{url}/v1/chat/completions", json=body(max_tokens), headers=headers or {}) as resp:
        return {"status": resp.status, "body": await resp.json()}


async def all_acknowledged(url: str, timeout: float) -> bool:
    """Wait until no lane of the inference queue holds a message, delivered or not."""
    nc = await nats.connect(url)
    js = nc.jetstream()

    async def drained() -> bool:
        for lane in names.LANES_BY_PRIORITY:
            info = await js.consumer_info(names.INFER_STREAM, names.scheduler_durable(lane))
            if info.num_pending or info.num_ack_pending:
                return False
        return True

    try:
        return await wait_for(drained, timeout=timeout)
    finally:
        await nc.close()


class InboxTap:
    """Every stream event published to any edge's reply inbox, as the engines sent them."""

    def __init__(self) -> None:
        self.starts: Counter[str] = Counter()
        self.deltas: dict[str, list[int]] = {}

    async def start(self, url: str) -> InboxTap:
        self.nc = await nats.connect(url)

        async def on_event(msg):
            event = decode_event(msg.data)
            if type(event) is StreamStart:
                self.starts[event.id] += 1
            elif type(event) is TokenDelta:
                self.deltas.setdefault(event.id, []).append(event.seq)

        await self.nc.subscribe(f"{names.REPLY_PREFIX}.>", cb=on_event)
        return self

    async def close(self) -> None:
        await self.nc.close()


async def test_engine_killed_mid_stream_every_client_gets_one_complete_continuous_answer(cluster):
    await cluster.start({"eng-a": 10, "eng-b": 10}, token_rate=10)
    tokens = 30  # 3 s per answer: the kill lands in the middle of every stream
    async with aiohttp.ClientSession() as http:
        tap = await InboxTap().start(cluster.server.url)
        try:
            streams = [asyncio.create_task(stream_chat(http, cluster.url, tokens)) for _ in range(20)]
            assert await cluster.heartbeating({"eng-a", "eng-b"}, busy=True)

            async def several_tokens_into_each_stream() -> bool:
                return len(tap.deltas) == 20 and all(len(seqs) >= 3 for seqs in tap.deltas.values())

            assert await wait_for(several_tokens_into_each_stream, timeout=30)
        finally:
            await tap.close()
        cluster.kill("eng-a")
        results = await asyncio.wait_for(asyncio.gather(*streams), timeout=60)
        for r in results:
            assert r["status"] == 200 and r["error"] is None, r
            assert r["text"] == expected(tokens), r  # nothing lost, nothing repeated, in order
            assert r["finish"] == "length"
            assert r["usage"] == {"prompt_tokens": 4, "completion_tokens": tokens, "total_tokens": tokens + 4}
        # The failover was real: some streams moved to eng-b, which also takes new work alone now.
        metrics = await (await http.get(f"{cluster.url}/metrics")).text()
        assert 'llm_edge_failovers_total{outcome="migrated"}' in metrics, metrics
        again = await asyncio.gather(*[plain_chat(http, cluster.url, 3) for _ in range(3)])
        assert all(r["status"] == 200 for r in again), again


async def test_engine_killed_before_its_first_token_the_request_runs_elsewhere(cluster):
    await cluster.start({"eng-a": 4, "eng-b": 4}, ttft=3.0, token_rate=50)
    async with aiohttp.ClientSession() as http:
        tap = await InboxTap().start(cluster.server.url)
        try:
            calls = [asyncio.create_task(plain_chat(http, cluster.url, 5)) for _ in range(6)]
            assert await cluster.heartbeating({"eng-a", "eng-b"}, busy=True)
            cluster.kill("eng-a")  # inside its 3 s before the first token
            results = await asyncio.wait_for(asyncio.gather(*calls), timeout=60)
        finally:
            await tap.close()
    for r in results:
        assert r["status"] == 200, r
        assert r["body"]["choices"][0]["message"]["content"] == expected(5)
        assert r["body"]["usage"]["completion_tokens"] == 5
    assert any("-r1" in rid for rid in tap.starts), "no request was re-dispatched"


async def test_a_scheduler_replica_sigkilled_mid_burst_loses_no_request_and_runs_none_twice(cluster):
    await cluster.start({"eng-a": 16, "eng-b": 16}, schedulers=2, token_rate=40, ack_wait=2.0)
    assert await cluster.heartbeating({"eng-a", "eng-b"})
    async with aiohttp.ClientSession() as http:
        tap = await InboxTap().start(cluster.server.url)
        try:
            calls = []
            for i in range(60):
                calls.append(asyncio.create_task(plain_chat(http, cluster.url, 4)))
                if i == 20:
                    cluster.kill("scheduler-0")
                await asyncio.sleep(0.02)
            results = await asyncio.wait_for(asyncio.gather(*calls), timeout=90)
            # Every message acknowledged: none can be redelivered any more, and an engine starts a copy (its
            # StreamStart) before the scheduler can acknowledge it, so every start there will be has been sent.
            assert await all_acknowledged(cluster.server.url, timeout=30)
        finally:
            await tap.close()
    assert cluster.sup.children["scheduler-0"].returncode == -signal.SIGKILL
    for r in results:
        assert r["status"] == 200, r
        assert r["body"]["choices"][0]["message"]["content"] == expected(4)
    ids = {r["body"]["id"] for r in results}
    assert len(ids) == 60
    assert all(tap.starts[rid] == 1 for rid in ids), {rid: n for rid, n in tap.starts.items() if n != 1}
    assert set(tap.starts) == ids  # no other stream ran at all


async def test_an_idempotency_key_retry_never_generates_twice(cluster):
    await cluster.start({"eng-a": 4}, token_rate=10)
    key = {"Idempotency-Key": "order-42"}
    async with aiohttp.ClientSession() as http:
        tap = await InboxTap().start(cluster.server.url)
        try:
            first = asyncio.create_task(plain_chat(http, cluster.url, 20, key))  # 2 s of tokens
            assert await cluster.heartbeating({"eng-a"}, busy=True)
            # A streaming retry while it runs: told so at once, not joined, not generated again.
            async with http.post(f"{cluster.url}/v1/chat/completions", headers=key,
                                 json=body(20, stream=True)) as resp:
                assert resp.status == 409, await resp.text()
                assert (await resp.json())["error"]["code"] == "conflict"
            waiting = asyncio.create_task(plain_chat(http, cluster.url, 20, key))  # waits for the first
            one, two = await asyncio.wait_for(asyncio.gather(first, waiting), timeout=30)
            three = await plain_chat(http, cluster.url, 20, key)  # after it finished: read back
            async with http.post(f"{cluster.url}/v1/chat/completions", headers=key,
                                 json=body(20, stream=True)) as resp:
                replay = await resp.text()
            async with http.post(f"{cluster.url}/v1/chat/completions", headers=key, json=body(7)) as resp:
                other_body = {"status": resp.status, "body": await resp.json()}
            other_key = await plain_chat(http, cluster.url, 20, {"Idempotency-Key": "order-43"})
            no_key = await plain_chat(http, cluster.url, 20)
        finally:
            await tap.close()
    assert one["status"] == two["status"] == three["status"] == 200, (one, two, three)
    assert one["body"] == two["body"] == three["body"]
    assert one["body"]["choices"][0]["message"]["content"] == expected(20)
    assert f'"id":"{one["body"]["id"]}"' in replay and replay.endswith("data: [DONE]\n\n")
    chunks = [json.loads(line[6:]) for line in replay.splitlines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == expected(20)
    assert other_body["status"] == 400 and other_body["body"]["error"]["code"] == "invalid_request"
    assert other_key["status"] == 200 and other_key["body"]["id"] != one["body"]["id"]
    assert no_key["status"] == 200
    assert tap.starts[one["body"]["id"]] == 1
    assert len(tap.starts) == 3  # generated once for order-42, once for order-43, once without a key
