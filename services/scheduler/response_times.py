"""Per-engine moving average of the dispatch round trip, for the ``response_time`` strategy. Pure.

What is measured: the time from sending ``llm.v1.engine.<worker>.generate`` to the engine's
accepted/busy answer, as the scheduler observes it. Tokens travel from the engine straight to
the client, so the scheduler never sees time-to-first-token; the dispatch round trip is its
closest observable (a slow or overloaded engine's event loop answers late).
"""

from __future__ import annotations


class ResponseTimes:
    """Exponentially weighted moving averages (seconds), one per engine."""

    def __init__(self, alpha: float = 0.2) -> None:
        self._alpha = alpha
        self._ewma: dict[str, float] = {}

    def observe(self, worker: str, seconds: float) -> None:
        """Fold one round trip of ``worker`` into its average."""
        old = self._ewma.get(worker)
        self._ewma[worker] = seconds if old is None else old + self._alpha * (seconds - old)

    def get(self, worker: str) -> float | None:
        """The average of ``worker``, or None if it was never measured."""
        return self._ewma.get(worker)

    def snapshot(self) -> dict[str, float]:
        """Every engine's average (a copy)."""
        return dict(self._ewma)

    def forget(self, worker: str) -> None:
        """Drop ``worker``'s history."""
        self._ewma.pop(worker, None)
