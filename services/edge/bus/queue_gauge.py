"""How full the inference queue is and how fast it drains, for an honest ``Retry-After``.

Every ``interval`` seconds the edge reads ``LLM_INFER``'s state. In a work-queue stream an
acknowledged message is removed, so ``last_seq - messages`` counts every request ever taken
off the queue; its growth over time is the drain rate of the whole cluster (all schedulers).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

import nats.errors
from nats.js import JetStreamContext

from schemas import names
from services.common.lifecycle import cancel_and_wait

log = logging.getLogger(__name__)

MIN_RETRY_AFTER = 1
MAX_RETRY_AFTER = 60


def retry_after_seconds(depth: int, drain_rate: float) -> int:
    """Seconds until ``depth`` queued requests drain at ``drain_rate`` per second, within [1, 60]."""
    if drain_rate <= 0:
        return MAX_RETRY_AFTER
    return max(MIN_RETRY_AFTER, min(MAX_RETRY_AFTER, math.ceil(depth / drain_rate)))


class DrainRate:
    """Exponentially weighted drain rate from successive (time, drained-so-far) samples. Pure."""

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self.rate = 0.0
        self.depth = 0
        self._last: tuple[float, int] | None = None

    def sample(self, now: float, drained: int, depth: int) -> None:
        """Record the queue's cumulative drained count and depth at ``now``."""
        self.depth = depth
        if self._last is not None and now > self._last[0]:
            instant = max(0, drained - self._last[1]) / (now - self._last[0])
            self.rate = instant if self.rate == 0 else self.alpha * instant + (1 - self.alpha) * self.rate
        self._last = (now, drained)

    def retry_after(self) -> int:
        """``Retry-After`` for a client refused because the queue is full."""
        return retry_after_seconds(self.depth, self.rate)


class QueueGauge:
    """Samples ``LLM_INFER`` in the background into a ``DrainRate``."""

    def __init__(self, js: JetStreamContext, interval: float = 1.0) -> None:
        self._js = js
        self._interval = interval
        self.drain = DrainRate()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin sampling."""
        self._task = asyncio.create_task(self._run(), name="edge-queue-gauge")

    async def stop(self) -> None:
        """Stop sampling."""
        if self._task is not None:
            await cancel_and_wait(self._task)

    async def sample(self) -> None:
        """Read the stream state once (errors are logged: the estimate just ages)."""
        try:
            info = await self._js.stream_info(names.INFER_STREAM)
        except (nats.errors.Error, TimeoutError) as exc:
            log.debug("queue gauge: stream info failed: %s", exc)
            return
        state = info.state
        self.drain.sample(time.monotonic(), state.last_seq - state.messages, state.messages)

    async def _run(self) -> None:
        while True:
            await self.sample()
            await asyncio.sleep(self._interval)
