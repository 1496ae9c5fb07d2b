"""The engine's side of the prompt cache: record a cacheable request's deltas, store the finished response.

The scheduler marks a cacheable request that missed the cache by setting its ``cache_key``;
the engine, which sees every delta and the real usage, writes a ``CachedResponse`` under that
key in KV ``llm_prompt_cache`` once the request ends successfully. The write runs after the
terminal event is published and never raises: a failed write only costs a future miss.
"""

from __future__ import annotations

import asyncio
import logging
import time

import nats.errors
from nats.js.kv import KeyValue

from schemas.cache import CachedDelta, CachedResponse
from schemas.events import Usage, encode

log = logging.getLogger(__name__)


class ResponseRecorder:
    """Collects one request's deltas as they are published. Pure."""

    def __init__(self, model: str) -> None:
        self._model = model
        self._deltas: list[CachedDelta] = []

    def delta(self, text: str, token_ids: list[int]) -> None:
        """One ``TokenDelta`` went out."""
        self._deltas.append(CachedDelta(text=text, token_ids=list(token_ids)))

    def finished(self, reason: str, usage: Usage) -> CachedResponse:
        """The complete response, once the request ended with ``reason``."""
        return CachedResponse(model=self._model, deltas=self._deltas, finish_reason=reason, usage=usage,
                              created=time.time())


class ResponseStore:
    """Writes finished responses to the bucket in background tasks (kept referenced until done)."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self._writes: set[asyncio.Task[None]] = set()

    def store(self, key: str, response: CachedResponse) -> None:
        """Start writing ``response`` under ``key``; returns at once."""
        task = asyncio.create_task(self._put(key, response))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _put(self, key: str, response: CachedResponse) -> None:
        try:
            await self._kv.put(key, encode(response))
        except (nats.errors.Error, TimeoutError) as exc:  # nats.js errors (bad key, limits) are nats.errors.Error
            log.warning("prompt cache entry %s not stored: %s", key[:16], exc)

    async def flush(self, timeout: float = 2.0) -> None:
        """Wait (up to ``timeout``) for the writes under way, e.g. before the connection drains."""
        if self._writes:
            await asyncio.wait(set(self._writes), timeout=timeout)
