"""A circuit breaker per engine. Pure: no I/O; the clock is injected.

A breaker opens after ``failures`` consecutive dispatch failures of its engine (no answer
within the dispatch timeout, nobody listening: an engine that answers "busy" is healthy). An
open engine gets no work for ``cooldown`` seconds; then the breaker half-opens and lets
exactly one dispatch through as a probe: an answer closes it, another failure re-opens it for
a new cooldown.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass


class CircuitState(enum.StrEnum):
    """Where one engine's breaker stands."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class _Breaker:
    failures: int = 0
    opened_at: float | None = None
    probing: bool = False


class CircuitBreakers:
    """The breakers of every engine this scheduler has dispatched to."""

    def __init__(self, *, failures: int, cooldown: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._threshold = failures
        self._cooldown = cooldown
        self._clock = clock
        self._breakers: dict[str, _Breaker] = {}

    def state(self, worker: str) -> CircuitState:
        """The breaker state of ``worker`` now (an unknown engine is closed)."""
        b = self._breakers.get(worker)
        if b is None or b.opened_at is None:
            return CircuitState.CLOSED
        if b.probing or self._clock() - b.opened_at >= self._cooldown:
            return CircuitState.HALF_OPEN
        return CircuitState.OPEN

    def allows(self, worker: str) -> bool:
        """Whether ``worker`` may be chosen now: closed, or half-open with no probe under way."""
        b = self._breakers.get(worker)
        if b is None or b.opened_at is None:
            return True
        return not b.probing and self._clock() - b.opened_at >= self._cooldown

    def dispatched(self, worker: str) -> None:
        """A dispatch goes to ``worker``; if its breaker is half-open, this is the one probe."""
        b = self._breakers.get(worker)
        if b is not None and b.opened_at is not None:
            b.probing = True

    def abandoned(self, worker: str) -> None:
        """The dispatch to ``worker`` was never made after all: a half-open breaker may probe again."""
        b = self._breakers.get(worker)
        if b is not None:
            b.probing = False

    def succeeded(self, worker: str) -> None:
        """``worker`` answered a dispatch (accepted, busy or refused): close its breaker."""
        self._breakers.pop(worker, None)

    def failed(self, worker: str) -> bool:
        """``worker`` did not answer a dispatch; True if this opened (or re-opened) its breaker."""
        b = self._breakers.setdefault(worker, _Breaker())
        b.failures += 1
        if b.probing or (b.opened_at is None and b.failures >= self._threshold):
            b.opened_at = self._clock()
            b.probing = False
            return True
        return False

    def tracked(self) -> list[str]:
        """Engines with a breaker on record (a failure since their last answer)."""
        return list(self._breakers)

    def open_count(self) -> int:
        """Engines whose breaker is not closed (open or half-open): the ``llm_scheduler_circuits_open`` gauge."""
        return sum(1 for b in self._breakers.values() if b.opened_at is not None)

    def forget(self, worker: str) -> None:
        """Drop ``worker``'s breaker (the engine left the table for good)."""
        self._breakers.pop(worker, None)
