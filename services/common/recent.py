"""Request ids remembered for a while: cancelled, accepted or finished ones (scheduler and engine)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class RecentIds:
    """A set of ids that forgets each id ``ttl`` seconds after it was added (bounded by ``max_size``)."""

    def __init__(self, ttl: float, *, max_size: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._max_size = max_size
        self._clock = clock
        self._expiry: OrderedDict[str, float] = OrderedDict()

    def add(self, request_id: str) -> None:
        """Remember ``request_id`` for the next ``ttl`` seconds."""
        now = self._clock()
        self._expiry[request_id] = now + self._ttl
        self._expiry.move_to_end(request_id)
        self._prune(now)

    def __contains__(self, request_id: object) -> bool:
        expiry = self._expiry.get(request_id)  # type: ignore[arg-type]
        return expiry is not None and expiry > self._clock()

    def __len__(self) -> int:
        self._prune(self._clock())
        return len(self._expiry)

    def _prune(self, now: float) -> None:
        # Insertion order is expiry order (one ttl for all), so expired ids are at the front.
        while self._expiry:
            oldest, expiry = next(iter(self._expiry.items()))
            if expiry > now and len(self._expiry) <= self._max_size:
                return
            del self._expiry[oldest]
