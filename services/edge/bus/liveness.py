"""The edge's view of the engines: the shared heartbeat feed plus the liveness sweep.

The same sweep cuts requests whose client has refused writes for ``write_timeout`` seconds.

The table answers "which models are served" (model checks, ``/v1/models``) and "is the engine
running this request alive" (the sweep, every ``interval`` seconds).
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.aio.client import Client
from nats.js import JetStreamContext

from services.common.heartbeat_feed import HeartbeatFeed
from services.common.lifecycle import cancel_and_wait, ticks
from services.common.worker_table import WorkerTable
from services.edge.bus.replies import ReplyRouter

log = logging.getLogger(__name__)


class LivenessWatch:
    """Keeps a ``WorkerTable`` current and ends requests whose engine died."""

    def __init__(self, table: WorkerTable, router: ReplyRouter, *, interval: float, grace: float,
                 write_timeout: float = 30.0) -> None:
        self.table = table
        self._feed = HeartbeatFeed(table)
        self._router = router
        self._interval = interval
        self._grace = grace
        self._write_timeout = write_timeout
        self._task: asyncio.Task[None] | None = None

    async def start(self, nc: Client, js: JetStreamContext) -> None:
        """Follow heartbeats (KV snapshot first), then start sweeping."""
        await self._feed.start(nc, js)
        self._task = asyncio.create_task(self._sweep_forever(), name="edge-liveness-sweep")

    async def stop(self) -> None:
        """Stop sweeping and unsubscribe."""
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        await self._feed.stop()

    def sweep(self) -> list[str]:
        """Drop engines that missed their heartbeats and end the requests they were running (and stalled streams)."""
        self.table.expire()
        now = time.monotonic()
        self._router.sweep_stalled(now, self._write_timeout)
        failed = self._router.sweep_lost_workers(self.table.is_alive, now, self._grace)
        if failed:
            log.warning("%d request(s) ended with worker_lost", len(failed))
        return failed

    async def _sweep_forever(self) -> None:
        async for on_time in ticks(self._interval):
            if on_time:  # a late sweep would judge engines by heartbeats not read yet
                self.sweep()
