"""The engine's heartbeats: its status on ``llm.v1.workers.status.<worker>`` and in KV ``llm_workers``.

A status goes out on every capacity or health change (coalesced) and at least every interval,
with a KV copy each interval. ``seq`` grows with every change, so a reader keeps the newest of a
heartbeat and a ``DispatchReply``.

The loop also notices when the process itself was not running for longer than the others wait
before declaring an engine dead (``stalled``: SIGSTOP, a frozen VM): by then its requests have
been moved elsewhere, and it must not send any more of their tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from nats.errors import Error as NatsError

from schemas import names
from schemas.events import encode
from schemas.heartbeat import EngineHeartbeat
from services.common.worker_table import DEAD_AFTER_INTERVALS

log = logging.getLogger(__name__)


class DecodeSpeed:
    """One stream's decode speed (tokens/s), a moving average over finished requests: what a heartbeat
    tells schedulers, so that they prefer a faster engine serving the same model."""

    def __init__(self, alpha: float = 0.2) -> None:
        self._alpha = alpha
        self.tokens_per_second = 0.0

    def observe(self, tokens_after_first: int, seconds: float) -> None:
        """A request generated ``tokens_after_first`` tokens in ``seconds`` after its first one."""
        if tokens_after_first < 1 or seconds <= 0:
            return
        rate = tokens_after_first / seconds
        old = self.tokens_per_second
        self.tokens_per_second = rate if old == 0 else old + self._alpha * (rate - old)


class Heartbeats:
    """Publishes ``status()`` on change and every ``interval`` seconds, and tells when the engine stalled."""

    def __init__(self, worker: str, interval: float, status: Callable[[], EngineHeartbeat], *,
                 on_periodic: Callable[[], None] = lambda: None,
                 on_stall: Callable[[str], None] = lambda _: None) -> None:
        self.worker = worker
        self.interval = interval
        self.seq = 0  # grows with every status change
        self._status = status
        self._on_periodic = on_periodic
        self._on_stall = on_stall
        self._changed = asyncio.Event()
        self._stopping = False
        self._last_beat = time.monotonic()
        self._nc = None
        self._kv = None
        self._kv_copy: asyncio.Task[None] | None = None  # the KV write under way, if any
        self._task: asyncio.Task[None] | None = None

    def changed(self) -> None:
        """The status changed: a new ``seq``, published at once (coalesced with other changes)."""
        self.seq += 1
        self._changed.set()

    def stalled(self) -> bool:
        """Whether the process was stopped for longer than three heartbeat intervals: everyone else has
        declared it dead and moved its requests."""
        return time.monotonic() - self._last_beat > DEAD_AFTER_INTERVALS * self.interval

    def stall_reason(self) -> str:
        """Why the engine gave up its requests after a stall."""
        return (f"engine {self.worker} was unresponsive for {time.monotonic() - self._last_beat:.1f}s (more than "
                f"{DEAD_AFTER_INTERVALS} heartbeat intervals); the request may have moved to another engine")

    def start(self, nc, kv) -> None:
        """Start beating on ``nc`` (and its KV copy in ``kv``)."""
        self._nc, self._kv = nc, kv
        self._last_beat = time.monotonic()
        self._task = asyncio.create_task(self._loop(), name="engine-heartbeats")

    async def stop(self, timeout: float = 5.0) -> None:
        """Publish the last status and stop."""
        self._stopping = True
        self._changed.set()
        if self._task is not None:
            await asyncio.wait([self._task], timeout=timeout)
        if self._kv_copy is not None:
            await asyncio.wait([self._kv_copy], timeout=timeout)

    async def publish(self, force_kv: bool) -> None:
        """Publish the status now (and store it in KV if ``force_kv``); a bus failure is logged."""
        data = encode(self._status())
        try:
            await self._nc.publish(names.worker_status(self.worker), data)
        except NatsError as exc:
            log.warning("heartbeat not published: %s", exc)
        if force_kv and (self._kv_copy is None or self._kv_copy.done()):
            # Apart from the core heartbeat: a KV write waits out a NATS leader election (seconds),
            # which must not silence the heartbeats the schedulers and edges judge liveness by.
            self._kv_copy = asyncio.create_task(self._put_kv_copy(data))

    async def _put_kv_copy(self, data: bytes) -> None:
        try:
            await self._kv.put(self.worker, data)
        except (NatsError, asyncio.TimeoutError) as exc:
            log.warning("heartbeat not copied to KV %s: %s", names.WORKERS_BUCKET, exc)

    async def forget(self) -> None:
        """Remove the KV copy (the engine is gone for good)."""
        with contextlib.suppress(NatsError, asyncio.TimeoutError):
            await self._kv.delete(self.worker)

    async def _loop(self) -> None:
        next_kv = 0.0
        while not self._stopping:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that races a set().
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._changed.wait()
            self._changed.clear()
            now = time.monotonic()
            if self.stalled():
                self._on_stall(self.stall_reason())
            self._last_beat = now
            periodic = now >= next_kv
            if periodic:
                next_kv = now + self.interval
                self._on_periodic()
            await self.publish(force_kv=periodic)
