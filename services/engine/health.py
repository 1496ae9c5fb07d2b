"""The engine's own health: every loaded backend's ``check_health``, on a schedule and on demand.

``check_backends`` is the verdict of one pass over the loaded models (no bus I/O). ``HealthMonitor``
runs it every interval, and at once when the service reports a backend exception (``poke``), so
a vLLM engine whose core died, or a transformers / llama.cpp engine whose model thread died, is
found within one interval instead of leaving its requests waiting until their deadline. On a
change of state it calls ``on_change``: the service then heartbeats the new state at once and, on
``failed``, ends its in-flight requests with a typed ``engine_failed`` error (which the edge's
failover re-dispatches).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from schemas.errors import BusError
from schemas.heartbeat import Health
from services.common.lifecycle import cancel_and_wait
from services.engine.backend import EngineBackend

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HealthState:
    """One verdict: ``ok``, ``degraded`` or ``failed``, and why when not ``ok``."""

    health: Health = Health.OK
    reason: str = ""

    @property
    def failed(self) -> bool:
        """Whether the engine cannot serve."""
        return self.health is Health.FAILED


async def check_backends(backends: Iterable[tuple[str, EngineBackend]], timeout: float) -> HealthState:
    """Run each ``(model id, backend)``'s ``check_health`` (at most ``timeout`` seconds each).

    A check that raises fails the engine, naming the model and the cause; a check that does not
    answer in time only degrades it (an engine busy with a long step is slow, not dead: a dead
    one is found by its own check or by its missed heartbeats).
    """
    failures: list[str] = []
    slow: list[str] = []
    for model, backend in backends:
        try:
            async with asyncio.timeout(timeout):
                await backend.check_health()
        except TimeoutError:
            slow.append(model)
        except BusError as exc:
            failures.append(f"{model}: {exc.message}")
        except Exception as exc:  # any failure of the check itself means the backend cannot be trusted
            failures.append(f"{model}: {type(exc).__name__}: {exc}")
    if failures:
        return HealthState(Health.FAILED, "; ".join(failures))
    if slow:
        return HealthState(Health.DEGRADED, f"health check of {', '.join(slow)} did not answer within {timeout:g}s")
    return HealthState()


class HealthMonitor:
    """Checks the backends every ``interval`` seconds and when poked; reports each change of state."""

    def __init__(self, backends: Callable[[], Iterable[tuple[str, EngineBackend]]], *, interval: float,
                 on_change: Callable[[HealthState, HealthState], None],
                 on_check: Callable[[HealthState], None] = lambda _: None) -> None:
        self._backends = backends
        self._interval = interval
        self._on_change = on_change
        self._on_check = on_check
        self._poked = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.state = HealthState()

    def poke(self) -> None:
        """Check now (a backend just raised): do not wait for the next interval."""
        self._poked.set()

    async def check(self) -> HealthState:
        """One pass; reports a change through ``on_change``. Returns the new state."""
        new = await check_backends(self._backends(), timeout=self._interval)
        self._on_check(new)
        old, self.state = self.state, new
        if new != old:
            if new.health is Health.OK:
                log.warning("engine health back to ok (was %s: %s)", old.health, old.reason)
            else:
                log.error("engine health %s: %s", new.health, new.reason)
            self._on_change(old, new)
        return new

    async def __aenter__(self) -> HealthMonitor:
        self._task = asyncio.create_task(self._loop(), name="engine-health")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._poked.wait()
            self._poked.clear()
            await self.check()
