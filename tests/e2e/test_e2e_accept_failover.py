"""An engine lost between accepting a dispatch and its first token: the request fails over, never hangs.

The edge learns which engine runs a request from its ``StreamStart``; the engine sends it before
it answers the scheduler "accepted", on the same connection, so the edge knows the engine by the
time the scheduler acknowledges the message. An engine SIGKILLed right after accepting is then
found by its missed heartbeats and the request re-dispatched, invisible to the client, instead of
the client waiting for its deadline. Counts of the failover metrics (a re-dispatch before the
first token, a migration mid-stream) are checked on the edge and on the scheduler (never timings).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid

import aiohttp
import msgspec
import nats
import pytest

from schemas import names
from schemas.events import StreamStart, decode_event, encode
from schemas.inference import DispatchReply
from tests.support import free_port
from tests.e2e.test_e2e_failover import SimCluster, body, expected, stream_chat
from tests.engine.test_engine_service import dispatch, request, running_engine


async def test_the_engine_sends_stream_start_before_it_answers_accepted(nc, nats_server):
    # One subscription for both subjects: NATS keeps a connection's messages in order, so the
    # order seen here is the order the engine sent them in.
    base = f"_INBOX.order-{uuid.uuid4().hex[:8]}"
    sub = await nc.subscribe(f"{base}.>")
    async with running_engine(nats_server.url, "--sim-ttft", "1") as (_, worker):
        # First an offer that is retried on "no responders" (a just-started engine's first offer
        # can get it): once answered, the engine's subscription is reachable from this connection.
        assert (await dispatch(nc, worker, request(nc.new_inbox(), max_tokens=1))).accepted
        req = request(f"{base}.events", max_tokens=2)
        await nc.publish(names.engine_generate(worker), encode(req), reply=f"{base}.accept")
        first, second = await sub.next_msg(timeout=5), await sub.next_msg(timeout=5)
    assert first.subject == f"{base}.events", "the accept overtook StreamStart"
    start = decode_event(first.data)
    assert type(start) is StreamStart and start.id == req.id and start.worker == worker
    assert second.subject == f"{base}.accept"
    assert msgspec.json.decode(second.data, type=DispatchReply).accepted


async def metric(http: aiohttp.ClientSession, url: str, series: str) -> float | None:
    """The value of one exact series line (``name{labels}``) in a Prometheus text page."""
    text = await (await http.get(url)).text()
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.mark.e2e
@pytest.mark.slow
async def test_an_engine_sigkilled_right_after_accepting_is_replaced_invisibly(tmp_path):
    cluster = SimCluster(tmp_path)
    scheduler_metrics = f"http://127.0.0.1:{(mport := free_port())}/metrics"
    try:
        # ttft 2 s: the kill (at StreamStart) lands long before any token of the first engine.
        await cluster.start({"eng-a": 4, "eng-b": 4}, ttft=2.0, scheduler_args=("--metrics-port", str(mport)))
        killed: list[str] = []
        tap = await cluster_tap(cluster, killed)
        try:
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{cluster.url}/v1/chat/completions",
                                     json=body(5, stream=True, stream_options={"include_usage": True})) as resp:
                    assert resp.status == 200
                    raw = await asyncio.wait_for(resp.text(), timeout=30)
                chunks = [json.loads(line[6:]) for line in raw.splitlines()
                          if line.startswith("data: {")]
                assert not [c for c in chunks if "error" in c], raw
                text = "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])
                assert text == expected(5)
                assert chunks[-1]["usage"]["completion_tokens"] == 5
                assert raw.endswith("data: [DONE]\n\n")
                assert len(killed) == 1
                edge = f"{cluster.url}/metrics"
                assert await metric(http, edge, 'llm_edge_failovers_total{outcome="redispatched"}') == 1
                assert await metric(http, edge, 'llm_edge_failovers_total{outcome="migrated"}') is None
                assert await metric(http, scheduler_metrics,
                                    'llm_scheduler_failover_dispatches_total{kind="redispatch"}') == 1
                assert await metric(http, scheduler_metrics,
                                    'llm_scheduler_failover_dispatches_total{kind="migration"}') == 0
                assert await metric(http, scheduler_metrics,
                                    'llm_scheduler_inference_requests_total{lane="normal",outcome="dispatched"}') == 2
                survivor = ({"eng-a", "eng-b"} - set(killed)).pop()
                assert await metric(http, scheduler_metrics,
                                    f'llm_scheduler_circuit_state{{state="closed",worker="{survivor}"}}') == 1
                assert await metric(http, scheduler_metrics, "llm_scheduler_workers_healthy") == 1
        finally:
            await tap.close()
        assert cluster.sup.children[killed[0]].returncode == -signal.SIGKILL
    finally:
        await cluster.stop()


@pytest.mark.e2e
@pytest.mark.slow
async def test_a_migration_mid_stream_is_counted_on_the_edge_and_on_the_scheduler(tmp_path):
    cluster = SimCluster(tmp_path)
    scheduler_metrics = f"http://127.0.0.1:{(mport := free_port())}/metrics"
    try:
        await cluster.start({"eng-a": 4, "eng-b": 4}, token_rate=10, scheduler_args=("--metrics-port", str(mport)))
        async with aiohttp.ClientSession() as http:
            tap = await cluster_tap(cluster, [], kill=False)  # before the request: it must see its StreamStart
            started = asyncio.Event()
            stream = asyncio.create_task(stream_chat(http, cluster.url, 20, started))  # 2 s of tokens
            try:
                await started.wait()  # the client has text: a kill now is mid-stream
                worker = tap.workers[0]
                os.kill(cluster.sup.children[worker].proc.pid, signal.SIGKILL)
                result = await asyncio.wait_for(stream, timeout=30)
            finally:
                await tap.close()
            assert result["error"] is None and result["text"] == expected(20), result
            edge = f"{cluster.url}/metrics"
            assert await metric(http, edge, 'llm_edge_failovers_total{outcome="migrated"}') == 1
            assert await metric(http, edge, 'llm_edge_failovers_total{outcome="redispatched"}') is None
            assert await metric(http, scheduler_metrics,
                                'llm_scheduler_failover_dispatches_total{kind="migration"}') == 1
            assert await metric(http, scheduler_metrics,
                                'llm_scheduler_failover_dispatches_total{kind="redispatch"}') == 0
    finally:
        await cluster.stop()


class StartTap:
    """Every ``StreamStart`` on any reply inbox; with ``kill``, SIGKILLs the engine of the first one the
    moment it is seen (recorded in ``killed``)."""

    def __init__(self, cluster: SimCluster, killed: list[str], kill: bool) -> None:
        self.cluster, self.killed, self.kill = cluster, killed, kill
        self.workers: list[str] = []

    async def start(self) -> StartTap:
        self.nc = await nats.connect(self.cluster.server.url)
        await self.nc.subscribe(f"{names.REPLY_PREFIX}.>", cb=self._on_event)
        return self

    async def _on_event(self, msg) -> None:
        event = decode_event(msg.data)
        if type(event) is not StreamStart:
            return
        self.workers.append(event.worker)
        if self.kill and not self.killed:
            self.killed.append(event.worker)
            os.kill(self.cluster.sup.children[event.worker].proc.pid, signal.SIGKILL)

    async def close(self) -> None:
        await self.nc.close()


async def cluster_tap(cluster: SimCluster, killed: list[str], *, kill: bool = True) -> StartTap:
    """A started ``StartTap``."""
    return await StartTap(cluster, killed, kill).start()
