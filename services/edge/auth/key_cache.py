"""API key records the edge looked up recently, trusted for ``ttl`` seconds.

The TTL is the bound on revocation: a revoked key stops working at most ``ttl`` seconds after
``./cy keys revoke`` (the default ``--auth-cache-ttl`` is 5 s). Unknown ids are remembered too,
so guessing keys cannot hammer the bucket; the cache is bounded and simply starts over when full.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from schemas.auth import ApiKeyRecord
from services.common.api_key_store import ApiKeyStore

_MAX_ENTRIES = 10_000


class ApiKeyCache:
    """``key id -> record (or None)`` in front of the ``llm_api_keys`` bucket."""

    def __init__(self, store: ApiKeyStore, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.ttl = ttl
        self._clock = clock
        self._entries: dict[str, tuple[float, ApiKeyRecord | None]] = {}

    async def get(self, key_id: str) -> ApiKeyRecord | None:
        """The record of ``key_id`` as of at most ``ttl`` seconds ago."""
        now = self._clock()
        hit = self._entries.get(key_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        record = await self.store.get(key_id)
        if self.ttl > 0:
            if len(self._entries) >= _MAX_ENTRIES:
                self._entries.clear()
            self._entries[key_id] = (now + self.ttl, record)
        return record
