"""The run-time routing strategy: KV ``llm_scheduler_config`` key ``strategy``, watched by every replica.

``nats kv put llm_scheduler_config strategy prefix_affinity`` switches the whole cluster; deleting
the key returns every replica to its configured strategy; an unknown value is logged and
ignored (the strategy in force stays).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from schemas import names
from services.common.lifecycle import cancel_and_wait
from services.scheduler.strategies import Strategy

log = logging.getLogger(__name__)

_REMOVED = (KV_DEL, KV_PURGE)


def parse_strategy(raw: bytes) -> Strategy | None:
    """The strategy named by a KV value (surrounding blanks and case ignored), or None if it names none."""
    try:
        return Strategy(raw.decode("utf-8", "replace").strip().lower())
    except ValueError:
        return None


class StrategyWatch:
    """Calls ``on_change(strategy)`` for every valid value of the key, ``on_change(None)`` when it is deleted."""

    def __init__(self, js: JetStreamContext, on_change: Callable[[Strategy | None], None]) -> None:
        self._js = js
        self._on_change = on_change
        self._watcher: KeyValue.KeyWatcher | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Apply the key's current value (if any), then follow it; a missing bucket is logged, not fatal."""
        try:
            kv = await self._js.key_value(names.SCHEDULER_CONFIG_BUCKET)
        except nats.js.errors.BucketNotFoundError:
            log.warning("KV bucket %s is missing (run ./cy infra apply): the routing strategy is fixed",
                        names.SCHEDULER_CONFIG_BUCKET)
            return
        self._watcher = await kv.watch(names.STRATEGY_KEY)
        self._task = asyncio.create_task(self._follow(self._watcher), name="scheduler-strategy-watch")

    async def stop(self) -> None:
        """Stop following the key."""
        if self._task is not None:
            await cancel_and_wait(self._task)
        if self._watcher is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._watcher.stop()

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is None:  # the marker after the initial values: nothing to apply
                continue
            if entry.operation in _REMOVED or not entry.value:
                log.info("routing strategy key removed: back to the configured strategy")
                self._on_change(None)
                continue
            strategy = parse_strategy(entry.value)
            if strategy is None:
                log.warning("ignoring unknown routing strategy %r in %s/%s (known: %s)", entry.value[:64],
                            names.SCHEDULER_CONFIG_BUCKET, names.STRATEGY_KEY, ", ".join(Strategy))
                continue
            self._on_change(strategy)
