"""The table of live engines, built only from their heartbeats. Pure: no I/O.

Used by the scheduler (where to dispatch) and the edge (which models are served, and
whether the engine streaming a request is still alive).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from schemas.heartbeat import EngineHeartbeat, Health, ServedModel
from schemas.inference import DispatchReply

DEAD_AFTER_INTERVALS = 3


@dataclass
class WorkerState:
    """The newest known status of one engine."""

    heartbeat: EngineHeartbeat
    last_seen: float
    in_flight: int
    seq: int

    @property
    def worker(self) -> str:
        """The engine's worker id."""
        return self.heartbeat.worker

    @property
    def free_slots(self) -> int:
        """Slots the engine reported free (never negative)."""
        return max(0, self.heartbeat.slots - self.in_flight)

    @property
    def failed(self) -> bool:
        """Whether the engine's own health checks say it cannot serve (it gets no work until they pass)."""
        return self.heartbeat.health == Health.FAILED

    def serves(self, model: str) -> bool:
        """Whether this engine has ``model`` loaded, by id or alias."""
        return any(m.id == model or model in m.aliases for m in self.heartbeat.models)


class WorkerTable:
    """Live engines keyed by worker id; an engine silent for three intervals is dead."""

    def __init__(self, *, dead_after_intervals: int = DEAD_AFTER_INTERVALS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._workers: dict[str, WorkerState] = {}
        self._dead_after = dead_after_intervals
        self._clock = clock

    def __len__(self) -> int:
        return len(self._workers)

    def __contains__(self, worker: str) -> bool:
        return worker in self._workers

    def get(self, worker: str) -> WorkerState | None:
        """The state of ``worker`` if it is in the table."""
        return self._workers.get(worker)

    def observe(self, hb: EngineHeartbeat) -> None:
        """Record a heartbeat; an older ``seq`` than already seen only refreshes liveness."""
        now = self._clock()
        state = self._workers.get(hb.worker)
        if state is None or hb.seq >= state.seq or hb.started != state.heartbeat.started:
            self._workers[hb.worker] = WorkerState(heartbeat=hb, last_seen=now, in_flight=hb.in_flight, seq=hb.seq)
        else:
            state.last_seen = now

    def observe_dispatch(self, reply: DispatchReply) -> None:
        """Take the engine's in-flight count from a dispatch reply if it is newer than the table's."""
        state = self._workers.get(reply.worker)
        if state is not None and reply.status_seq > state.seq:
            state.in_flight = reply.in_flight
            state.seq = reply.status_seq

    def remove(self, worker: str) -> None:
        """Forget ``worker`` (it said it is gone, or it failed)."""
        self._workers.pop(worker, None)

    def is_alive(self, worker: str) -> bool:
        """Whether ``worker`` heart-beat within the last three of its intervals."""
        state = self._workers.get(worker)
        return state is not None and not self._is_dead(state, self._clock())

    def silent_too_long(self, state: WorkerState) -> bool:
        """Whether the engine whose newest known status is ``state`` (in the table or not) is dead by now."""
        return self._is_dead(state, self._clock())

    def _is_dead(self, state: WorkerState, now: float) -> bool:
        return now - state.last_seen > self._dead_after * state.heartbeat.interval

    def expire(self) -> list[str]:
        """Drop and return the workers that missed three heartbeat intervals."""
        now = self._clock()
        dead = [w for w, s in self._workers.items() if self._is_dead(s, now)]
        for w in dead:
            del self._workers[w]
        return dead

    def live(self) -> list[WorkerState]:
        """Every worker not (yet) dead, draining ones included."""
        now = self._clock()
        return [s for s in self._workers.values() if not self._is_dead(s, now)]

    def candidates(self, model: str) -> list[WorkerState]:
        """Live, non-draining, not failed workers that serve ``model``."""
        return [s for s in self.live() if not s.heartbeat.draining and not s.failed and s.serves(model)]

    def models(self) -> dict[str, ServedModel]:
        """Every model some live, non-draining worker serves, by id."""
        out: dict[str, ServedModel] = {}
        for s in self.live():
            if s.heartbeat.draining:
                continue
            for m in s.heartbeat.models:
                out.setdefault(m.id, m)
        return out

    def resolve(self, name: str) -> ServedModel | None:
        """The served model called ``name`` (id or alias), if any live worker has it."""
        for s in self.live():
            if s.heartbeat.draining:
                continue
            for m in s.heartbeat.models:
                if m.id == name or name in m.aliases:
                    return m
        return None
