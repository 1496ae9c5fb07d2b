"""A hung engine (SIGSTOP: alive, silent) with real processes: its request fails over as if it had died,
and once it resumes (SIGCONT) it sends no more tokens for the request that moved elsewhere."""

from __future__ import annotations

import asyncio
import os
import signal

import aiohttp
import nats
import pytest

from schemas import names
from schemas.events import StreamEnd, StreamError, StreamStart, TokenDelta, decode_event
from services.common import bus
from tests.e2e.test_e2e_failover import cluster, expected, stream_chat  # noqa: F401 - fixture

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


class ReplyLog:
    """Every stream event on any edge inbox, in arrival order, by bus id (one attempt of a request)."""

    def __init__(self) -> None:
        self.events: dict[str, list] = {}
        self.changed = asyncio.Event()

    async def start(self, url: str) -> ReplyLog:
        self.nc = await nats.connect(url)

        async def on_event(msg):
            event = decode_event(msg.data)
            self.events.setdefault(event.id, []).append(event)
            self.changed.set()

        await self.nc.subscribe(f"{names.REPLY_PREFIX}.>", cb=on_event)
        await bus.flush(self.nc)
        return self

    async def until(self, predicate, timeout: float = 30.0):
        """Wait until ``predicate()`` returns something truthy, re-checking on every event; return it."""
        async with asyncio.timeout(timeout):
            while not (found := predicate()):
                self.changed.clear()
                await self.changed.wait()
        return found

    def of(self, bus_id: str, kind: type) -> list:
        return [e for e in self.events.get(bus_id, []) if type(e) is kind]


async def test_a_stopped_engine_is_failed_over_and_after_sigcont_sends_nothing_for_the_moved_request(cluster):
    await cluster.start({"eng-a": 4, "eng-b": 4}, token_rate=10)
    log = await ReplyLog().start(cluster.server.url)
    tokens = 30  # 3 s at 10 tokens/s: the stop lands mid-stream
    try:
        async with aiohttp.ClientSession() as http:
            stream = asyncio.create_task(stream_chat(http, cluster.url, tokens))
            start = await log.until(lambda: next((e for evs in log.events.values() for e in evs
                                                  if type(e) is StreamStart), None))
            first, hung = start.id, start.worker
            await log.until(lambda: len(log.of(first, TokenDelta)) >= 3)  # mid-stream
            pid = cluster.sup.children[hung].proc.pid
            os.kill(pid, signal.SIGSTOP)
            try:
                result = await asyncio.wait_for(stream, timeout=60)
                # The client got one complete answer: the hung engine's part, then the rest from the other one.
                assert result["status"] == 200 and result["error"] is None, result
                assert result["text"] == expected(tokens) and result["finish"] == "length", result
                moved = names.attempt_id(first, 1)
                assert [s.worker for s in log.of(moved, StreamStart)] == [w for w in cluster.engines if w != hung]
                # Its end reached the edge (the client has it); this log's own subscription may get it a little later.
                await log.until(lambda: log.of(moved, StreamEnd), timeout=10)
                sent_before = len(log.of(first, TokenDelta))
                assert not log.of(first, StreamEnd) and not log.of(first, StreamError)
            finally:
                os.kill(pid, signal.SIGCONT)
            # The resumed engine acts on the old request (it ends it: the proof it ran again) and, in the
            # same ordered stream of its messages, sent no token for it before that.
            end = await log.until(lambda: log.of(first, StreamError))
            assert end[0].code in ("engine_failed", "cancelled"), end
            assert len(log.of(first, TokenDelta)) == sent_before
            # It serves again: a new request completes.
            again = await stream_chat(http, cluster.url, 3)
            assert again["text"] == expected(3), again
    finally:
        await log.nc.close()
