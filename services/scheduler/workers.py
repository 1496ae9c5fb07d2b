"""Keeps the scheduler's worker table current: the shared heartbeat feed plus expiry of silent engines."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from nats.aio.client import Client
from nats.js import JetStreamContext

from schemas.heartbeat import EngineHeartbeat
from services.common.heartbeat_feed import HeartbeatFeed
from services.common.lifecycle import cancel_and_wait, ticks
from services.common.worker_table import DEAD_AFTER_INTERVALS, WorkerState, WorkerTable

log = logging.getLogger(__name__)


class WorkerTracker:
    """Feeds ``table`` from heartbeats and drops engines silent for three intervals.

    ``on_change`` is called after every heartbeat (capacity may have freed up); ``on_health``
    with the number of live, non-draining engines when an engine joins or changes its draining
    flag, and on every expiry pass (every ``expire_interval``); ``after_expiry`` is awaited after
    every expiry pass (the scheduler ends the requests of engines found dead).
    """

    def __init__(self, nc: Client, js: JetStreamContext, table: WorkerTable, *, expire_interval: float,
                 on_change: Callable[[], None], on_health: Callable[[int], None],
                 after_expiry: Callable[[], Awaitable[None]] | None = None) -> None:
        self._nc = nc
        self._js = js
        self._table = table
        self._feed = HeartbeatFeed(table, self._observed)
        self._expire_interval = expire_interval
        self._on_change = on_change
        self._on_health = on_health
        self._after_expiry = after_expiry
        self._expiry: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Follow heartbeats (KV snapshot first), then start expiry."""
        await self._feed.start(self._nc, self._js)
        self._expiry = asyncio.create_task(self._expire_loop(), name="scheduler-worker-expiry")

    async def stop(self) -> None:
        """Stop listening and expiring."""
        if self._expiry is not None:
            await cancel_and_wait(self._expiry)
        await self._feed.stop()

    def _observed(self, hb: EngineHeartbeat, before: WorkerState | None) -> None:
        if before is None or before.heartbeat.draining != hb.draining:
            self._report_health()
        self._on_change()

    def _report_health(self) -> None:
        self._on_health(sum(1 for s in self._table.live() if not s.heartbeat.draining and not s.failed))

    async def _expire_loop(self) -> None:
        await self._expire()
        async for on_time in ticks(self._expire_interval):
            if on_time:  # a late pass would judge engines by heartbeats not read yet
                await self._expire()

    async def _expire(self) -> None:
        dead = self._table.expire()
        for worker in dead:
            log.warning("engine %s missed %d heartbeats: no more work goes to it", worker, DEAD_AFTER_INTERVALS)
        self._report_health()  # also catches engines forgotten on a failed dispatch
        if self._after_expiry is not None:
            await self._after_expiry()
