"""A late accept never doubles an answer: failover loses nothing and repeats nothing.

An engine whose event loop is frozen past the scheduler's ``dispatch_timeout`` (SIGSTOP here, a
blocking call in production) still has the dispatch in its socket. The scheduler gives up on it
and re-dispatches to another engine; when the frozen engine wakes up, it must not also generate
onto the request's reply subject. Real processes: nats-server, scheduler, edge and two simulated
engines. The simulated engine answers ``tok1 tok2 ... tokN``, so a doubled or interleaved answer
differs from ``expected(N)``.
"""

from __future__ import annotations

import asyncio
import os
import signal

import aiohttp
import msgspec
import nats
import pytest

from schemas import names
from schemas.events import StreamStart, TokenDelta, decode_event, encode
from schemas.inference import DispatchReply, InferenceRequest
from tests.support import free_port
from tests.e2e.test_e2e_accept_failover import metric
from tests.e2e.test_e2e_failover import MODEL, SimCluster, expected, stream_chat

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LATE, HEALTHY = "eng-late", "eng-ok"


class ResumeTap:
    """Every ``StreamStart`` and ``TokenDelta`` on any reply inbox; resumes the frozen engine the moment
    another engine starts the request (so a late accept would run while that answer streams)."""

    def __init__(self, cluster: SimCluster) -> None:
        self.cluster = cluster
        self.starts: list[tuple[str, str]] = []  # (request id, worker)
        self.deltas: dict[str, int] = {}
        self.resumed = asyncio.Event()

    async def start(self) -> ResumeTap:
        self.nc = await nats.connect(self.cluster.server.url)
        await self.nc.subscribe(f"{names.REPLY_PREFIX}.>", cb=self._on_event)
        return self

    async def _on_event(self, msg) -> None:
        try:
            event = decode_event(msg.data)
        except msgspec.ValidationError:
            return  # another inbox's traffic (JetStream API replies, dispatch answers)
        if type(event) is TokenDelta:
            self.deltas[event.id] = self.deltas.get(event.id, 0) + 1
        elif type(event) is StreamStart:
            self.starts.append((event.id, event.worker))
            if event.worker == HEALTHY and not self.resumed.is_set():
                resume(self.cluster)
                self.resumed.set()

    async def close(self) -> None:
        await self.nc.close()


def resume(cluster: SimCluster) -> None:
    """SIGCONT the frozen engine (a no-op if it runs)."""
    os.kill(cluster.sup.children[LATE].proc.pid, signal.SIGCONT)


async def probe(nc, worker: str, request_id: str) -> bool:
    """Whether ``worker`` runs or just ran ``request_id`` (the scheduler's redelivery probe)."""
    req = InferenceRequest(id=request_id, model=MODEL, reply_to=names.reply_inbox("probe", request_id), probe=True)
    resp = await nc.request(names.engine_generate(worker), encode(req), timeout=10)
    return msgspec.json.decode(resp.data, type=DispatchReply).accepted


async def test_an_engine_that_accepts_after_the_dispatch_timeout_never_doubles_the_answer(tmp_path):
    cluster = SimCluster(tmp_path)
    scheduler_metrics = f"http://127.0.0.1:{(mport := free_port())}/metrics"
    try:
        # eng-late has the most free slots: least-connections sends it the request first.
        await cluster.start({LATE: 8, HEALTHY: 2}, token_rate=10,
                            scheduler_args=("--dispatch-timeout", "0.5", "--metrics-port", str(mport)))
        tap = await ResumeTap(cluster).start()
        try:
            async with aiohttp.ClientSession() as http:
                os.kill(cluster.sup.children[LATE].proc.pid, signal.SIGSTOP)  # frozen, its heartbeat still fresh
                try:
                    result = await asyncio.wait_for(stream_chat(http, cluster.url, 10), timeout=30)  # 1 s of tokens
                finally:
                    resume(cluster)
                assert tap.resumed.is_set()
                # The scheduler really offered the request to the frozen engine first, and gave up on it.
                assert await metric(http, scheduler_metrics,
                                    'llm_scheduler_dispatch_attempts_total{result="no_reply"}') == 1
                assert await metric(http, scheduler_metrics, "llm_scheduler_dispatch_retries_total") == 1
            assert result["status"] == 200 and result["error"] is None, result
            assert result["text"] == expected(10), result  # exactly one answer, not doubled, not interleaved
            assert result["finish"] == "length"
            assert result["usage"] == {"prompt_tokens": 4, "completion_tokens": 10, "total_tokens": 14}
            [(request_id, worker)] = tap.starts[:1]
            assert worker == HEALTHY
            # Answered after the late dispatch (same subscription, in order): the woken engine refused it.
            assert not await probe(tap.nc, LATE, request_id)
            assert tap.starts == [(request_id, HEALTHY)]  # the late engine never started it
            assert tap.deltas == {request_id: 10}
        finally:
            await tap.close()
    finally:
        resume(cluster) if LATE in cluster.sup.children else None
        await cluster.stop()
