"""Keeping a ``WorkerTable`` current from the bus, the same way in the edge and the scheduler.

Subscribe to ``llm.v1.workers.status.*`` first (so no heartbeat is missed), then load the
engines that were alive before this process started from KV ``llm_workers``. A stored
heartbeat is as old as its timestamp: one older than three intervals is a dead engine.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError

from schemas import names
from schemas.heartbeat import EngineHeartbeat
from services.common.buckets import kv_keys
from services.common.worker_table import DEAD_AFTER_INTERVALS, WorkerState, WorkerTable

log = logging.getLogger(__name__)

_decoder = msgspec.json.Decoder(EngineHeartbeat)
_MAX_BAD_SOURCES_LOGGED = 1000

Observer = Callable[[EngineHeartbeat, WorkerState | None], None]


class HeartbeatFeed:
    """Feeds ``table``; ``on_observed(heartbeat, previous_state)`` runs after every accepted heartbeat."""

    def __init__(self, table: WorkerTable, on_observed: Observer | None = None) -> None:
        self.table = table
        self._on_observed = on_observed
        self._sub: Subscription | None = None
        self._bad_sources: set[str] = set()

    async def start(self, nc: Client, js: JetStreamContext) -> int:
        """Subscribe, then bootstrap from KV; the number of engines loaded from KV."""
        self._sub = await nc.subscribe(names.WORKER_STATUS_ALL, cb=self._on_status)
        return await self._bootstrap(js)

    async def stop(self) -> None:
        """Stop listening."""
        if self._sub is not None:
            with contextlib.suppress(nats.errors.ConnectionClosedError):
                await self._sub.unsubscribe()
            self._sub = None

    def decode(self, data: bytes, source: str) -> EngineHeartbeat | None:
        """A valid heartbeat, or None (a bad source is logged once, not every second)."""
        try:
            hb = _decoder.decode(data)
            names.token(hb.worker)  # its id becomes a subject token: llm.v1.engine.<worker>.generate
            return hb
        except (msgspec.DecodeError, ValueError) as exc:
            if source not in self._bad_sources and len(self._bad_sources) < _MAX_BAD_SOURCES_LOGGED:
                self._bad_sources.add(source)
                log.warning("ignoring malformed heartbeat from %s: %s", source, exc)
            return None

    def _observe(self, hb: EngineHeartbeat) -> None:
        before = self.table.get(hb.worker)
        self.table.observe(hb)
        if self._on_observed is not None:
            self._on_observed(hb, before)

    async def _on_status(self, msg: Msg) -> None:
        hb = self.decode(msg.data, msg.subject)
        if hb is not None:
            self._observe(hb)

    async def _bootstrap(self, js: JetStreamContext) -> int:
        try:
            kv = await js.key_value(names.WORKERS_BUCKET)
            keys = await kv_keys(kv)
        except BucketNotFoundError:
            log.warning("KV bucket %s is missing (run ./cy infra apply); heartbeats alone will fill the table",
                        names.WORKERS_BUCKET)
            return 0
        loaded = 0
        now = time.time()
        for key in keys:
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:  # expired or deleted (a delete marker), or gone since it was listed
                continue
            hb = self.decode(entry.value or b"", f"{names.WORKERS_BUCKET}/{key}")
            if hb is not None and now - hb.ts <= DEAD_AFTER_INTERVALS * hb.interval:
                self._observe(hb)
                loaded += 1
        if loaded:
            log.info("worker table bootstrapped from KV %s: %d engine(s)", names.WORKERS_BUCKET, loaded)
        return loaded
