"""Which engine gets the next request: a pure policy over the worker table.

An engine's *effective* free slots are what it reported free minus the dispatches this
scheduler has sent it and not yet heard back about (``reserved``), so a burst of concurrent
dispatches never overfills an engine between two of its heartbeats.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence

from services.common.worker_table import WorkerState

_NONE: Mapping[str, int] = {}


def effective_free(state: WorkerState, reserved: Mapping[str, int] = _NONE) -> int:
    """Slots of ``state`` free after this scheduler's unanswered dispatches to it (never negative)."""
    return max(0, state.free_slots - reserved.get(state.worker, 0))


def free_capacity(workers: Iterable[WorkerState], reserved: Mapping[str, int] = _NONE) -> int:
    """Total effective free slots over non-draining ``workers``: how much work may be taken now."""
    return sum(effective_free(s, reserved) for s in workers if not s.heartbeat.draining)


def select_worker(candidates: Sequence[WorkerState], *, reserved: Mapping[str, int] = _NONE,
                  exclude: Collection[str] = (), turn: int = 0) -> WorkerState | None:
    """The least-loaded candidate with a free slot, or ``None`` if every one is full.

    Most effective free slots wins; a tie goes to the fewest requests in flight (reserved
    included); a remaining tie is broken round robin by ``turn`` over the tied worker ids, so
    equal engines share the load. Draining engines and ids in ``exclude`` are never chosen.
    """
    best: list[WorkerState] = []
    best_key: tuple[int, int] | None = None
    for state in candidates:
        if state.heartbeat.draining or state.worker in exclude:
            continue
        free = effective_free(state, reserved)
        if free <= 0:
            continue
        key = (-free, state.in_flight + reserved.get(state.worker, 0))
        if best_key is None or key < best_key:
            best, best_key = [state], key
        elif key == best_key:
            best.append(state)
    if not best:
        return None
    best.sort(key=lambda s: s.worker)
    return best[turn % len(best)]
