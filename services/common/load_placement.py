"""Which engine loads a model that no live engine serves (cold start, POST /v1/models/load). Pure: no I/O.

An engine can take the load when it is live, not draining, advertises run-time loading
(``max_models`` > 0 in its heartbeat) and is of a kind that can serve the registry entry.
Engines with room for another model come first, then those that can make room by unloading
an idle model; an engine whose every model has requests in flight would refuse, so it is not
asked. Among equals the least loaded wins, then the one holding fewer models.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from schemas.registry import ModelEntry
from services.common.model_registry import engine_can_serve
from services.common.worker_table import WorkerState

ROOM, EVICT, FULL = 0, 1, 2


def room(state: WorkerState) -> int:
    """``ROOM`` (a free model place), ``EVICT`` (an idle model can be unloaded) or ``FULL``."""
    hb = state.heartbeat
    if len(hb.models) < hb.max_models:
        return ROOM
    return EVICT if any(m.in_flight == 0 for m in hb.models) else FULL


def can_load(state: WorkerState, entry: ModelEntry) -> bool:
    """Whether ``state`` is an engine that could load ``entry`` at all (ignoring how busy it is)."""
    hb = state.heartbeat
    return not hb.draining and hb.max_models > 0 and engine_can_serve(hb.engine, entry)


def loader_candidates(entry: ModelEntry, workers: Iterable[WorkerState], *, reserved: Mapping[str, int] = {},
                      exclude: Collection[str] = ()) -> list[WorkerState]:
    """Engines to ask to load ``entry``, best first (see the module docstring)."""
    def load(s: WorkerState) -> float:
        return (s.in_flight + reserved.get(s.worker, 0)) / max(1, s.heartbeat.slots)

    able = [s for s in workers if s.worker not in exclude and can_load(s, entry) and room(s) != FULL]
    return sorted(able, key=lambda s: (room(s), load(s), len(s.heartbeat.models), s.worker))
