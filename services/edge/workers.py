"""Feeding the edge's ``WorkerTable`` from the bus: a KV snapshot at start, then every heartbeat.

The table answers "which models are served" (model checks, ``/v1/models``) and "is the engine
running this request alive" (the liveness sweep, every ``interval`` seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from schemas import names
from schemas.heartbeat import EngineHeartbeat
from services.common.worker_table import DEAD_AFTER_INTERVALS, WorkerTable
from services.edge.replies import ReplyRouter

log = logging.getLogger(__name__)

_heartbeat_decoder = msgspec.json.Decoder(EngineHeartbeat)
_MAX_BAD_SUBJECTS_LOGGED = 1000


class WorkerFeed:
    """Keeps a ``WorkerTable`` current and ends requests whose engine died."""

    def __init__(self, table: WorkerTable, router: ReplyRouter, *, interval: float, grace: float) -> None:
        self.table = table
        self._router = router
        self._interval = interval
        self._grace = grace
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._bad_subjects: set[str] = set()

    async def start(self, nc: Client, js: JetStreamContext) -> None:
        """Subscribe to heartbeats first (so none is missed), then load the KV snapshot, then start sweeping."""
        self._sub = await nc.subscribe(names.WORKER_STATUS_ALL, cb=self._on_heartbeat)
        await self._bootstrap(js)
        self._task = asyncio.create_task(self._sweep_forever(), name="edge-liveness-sweep")

    async def stop(self) -> None:
        """Stop sweeping and unsubscribe."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._sub is not None:
            with contextlib.suppress(nats.errors.ConnectionClosedError):  # nothing to unsubscribe from
                await self._sub.unsubscribe()
            self._sub = None

    def _decode(self, data: bytes, source: str) -> EngineHeartbeat | None:
        try:
            return _heartbeat_decoder.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            # Heartbeats repeat every second: log a bad source once, not every beat.
            if source not in self._bad_subjects and len(self._bad_subjects) < _MAX_BAD_SUBJECTS_LOGGED:
                self._bad_subjects.add(source)
                log.warning("ignoring malformed heartbeat from %s: %s", source, exc)
            return None

    async def _on_heartbeat(self, msg: Msg) -> None:
        hb = self._decode(msg.data, msg.subject)
        if hb is not None:
            self.table.observe(hb)

    async def _bootstrap(self, js: JetStreamContext) -> None:
        """Load the engines that were alive before this edge started from KV ``llm_workers``."""
        try:
            kv = await js.key_value(names.WORKERS_BUCKET)
            keys = await kv.keys()
        except nats.js.errors.NoKeysError:
            return  # an empty bucket: no engine yet
        except nats.js.errors.BucketNotFoundError:
            log.warning("KV bucket %s does not exist (infra not provisioned?); waiting for heartbeats",
                        names.WORKERS_BUCKET)
            return
        now = time.time()
        for key in keys:
            try:
                entry = await kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                continue  # expired between keys() and get()
            hb = self._decode(entry.value or b"", f"{names.WORKERS_BUCKET}/{key}")
            # An entry can outlive its engine by up to the bucket TTL; only take fresh ones.
            if hb is not None and now - hb.ts <= DEAD_AFTER_INTERVALS * hb.interval:
                self.table.observe(hb)
        log.info("worker table bootstrapped: %d live engine(s)", len(self.table))

    def sweep(self) -> list[str]:
        """Drop engines that missed their heartbeats and end the requests they were running."""
        self.table.expire()
        failed = self._router.sweep_lost_workers(self.table.is_alive, time.monotonic(), self._grace)
        if failed:
            log.warning("%d request(s) ended with worker_lost", len(failed))
        return failed

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self.sweep()
