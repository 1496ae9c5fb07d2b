"""Keeps the worker table current: engine heartbeats on the bus, bootstrapped from KV ``llm_workers``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NoKeysError

from schemas import names
from schemas.heartbeat import EngineHeartbeat
from services.common.worker_table import DEAD_AFTER_INTERVALS, WorkerTable

log = logging.getLogger(__name__)

_heartbeat_decoder = msgspec.json.Decoder(EngineHeartbeat)


class WorkerFeed:
    """Feeds ``table`` from ``llm.v1.workers.status.*`` and drops engines silent for three intervals.

    ``on_change`` is called after every heartbeat (capacity may have freed up); ``on_health``
    with the number of live, non-draining engines when an engine joins or changes its draining
    flag, and on every expiry pass (every ``expire_interval``).
    """

    def __init__(self, nc: Client, js: JetStreamContext, table: WorkerTable, *, expire_interval: float,
                 on_change: Callable[[], None], on_health: Callable[[int], None]) -> None:
        self._nc = nc
        self._js = js
        self._table = table
        self._expire_interval = expire_interval
        self._on_change = on_change
        self._on_health = on_health
        self._sub: Subscription | None = None
        self._expiry: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribe first (so nothing is missed), then load what KV already holds, then start expiry."""
        self._sub = await self._nc.subscribe(names.WORKER_STATUS_ALL, cb=self._on_status)
        await self._bootstrap()
        self._expiry = asyncio.create_task(self._expire_loop(), name="scheduler-worker-expiry")

    async def stop(self) -> None:
        """Stop listening and expiring."""
        if self._expiry is not None:
            self._expiry.cancel()
            await asyncio.gather(self._expiry, return_exceptions=True)
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def _on_status(self, msg: Msg) -> None:
        try:
            hb = _heartbeat_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            log.warning("ignoring malformed heartbeat on %s: %s", msg.subject, exc)
            return
        if not self._acceptable(hb):
            return
        before = self._table.get(hb.worker)
        self._table.observe(hb)
        if before is None or before.heartbeat.draining != hb.draining:
            self._report_health()
        self._on_change()

    def _report_health(self) -> None:
        self._on_health(sum(1 for s in self._table.live() if not s.heartbeat.draining))

    @staticmethod
    def _acceptable(hb: EngineHeartbeat) -> bool:
        try:
            names.token(hb.worker)  # its id becomes a subject token: llm.v1.engine.<worker>.generate
        except ValueError as exc:
            log.warning("ignoring heartbeat: %s", exc)
            return False
        return True

    async def _bootstrap(self) -> None:
        try:
            kv = await self._js.key_value(names.WORKERS_BUCKET)
            keys = await kv.keys()
        except NoKeysError:  # empty bucket: no engine has heart-beaten within its TTL
            return
        except BucketNotFoundError:
            log.warning("KV bucket %s is missing (run provisioning); heartbeats alone will fill the table",
                        names.WORKERS_BUCKET)
            return
        loaded = 0
        for key in keys:
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:  # expired or deleted since keys() listed it
                continue
            if entry.value and self._observe_stored(entry.value):
                loaded += 1
        if loaded:
            log.info("worker table bootstrapped from KV %s: %d engine(s)", names.WORKERS_BUCKET, loaded)
            self._report_health()
            self._on_change()

    def _observe_stored(self, data: bytes) -> bool:
        try:
            hb = _heartbeat_decoder.decode(data)
        except msgspec.DecodeError as exc:
            log.warning("ignoring malformed heartbeat in KV %s: %s", names.WORKERS_BUCKET, exc)
            return False
        # A stored heartbeat is as old as its timestamp; one already past three intervals is a dead engine.
        if time.time() - hb.ts > DEAD_AFTER_INTERVALS * hb.interval or not self._acceptable(hb):
            return False
        self._table.observe(hb)
        return True

    async def _expire_loop(self) -> None:
        while True:
            dead = self._table.expire()
            for worker in dead:
                log.warning("engine %s missed %d heartbeats: no more work goes to it", worker, DEAD_AFTER_INTERVALS)
            self._report_health()  # also catches engines forgotten on a failed dispatch
            await asyncio.sleep(self._expire_interval)
