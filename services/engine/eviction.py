"""Which loaded models to unload so that one more fits: least recently used idle models first. Pure.

A model with requests in flight is never chosen. Limits are a number of models
(``max_models``) and a memory budget in bytes (``budget``, 0 = none) against the memory the
engine uses now plus what the new model is expected to take.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelUsage:
    """One loaded model as eviction sees it."""

    id: str
    last_used: float
    in_flight: int
    memory_bytes: int


class NoRoom(Exception):
    """No choice of idle models frees enough: every candidate is busy, or the model alone exceeds the budget."""


def plan_evictions(loaded: Sequence[ModelUsage], *, max_models: int, budget: int, used_bytes: int,
                   need_bytes: int) -> list[str]:
    """Ids to unload (least recently used first) before loading a model of ``need_bytes``; ``NoRoom`` if impossible."""
    if budget and need_bytes > budget:
        raise NoRoom(f"the model needs about {need_bytes} bytes, more than the whole memory budget of {budget} bytes")
    idle = sorted((m for m in loaded if m.in_flight == 0), key=lambda m: (m.last_used, m.id))
    count, used, out = len(loaded), used_bytes, []

    def fits() -> bool:
        return (not max_models or count + 1 <= max_models) and (not budget or used + need_bytes <= budget)

    for model in idle:
        if fits():
            break
        out.append(model.id)
        count -= 1
        used -= model.memory_bytes
    if not fits():
        busy = len(loaded) - len(idle)
        raise NoRoom(f"{len(loaded)} model(s) loaded (limit {max_models or 'none'}), {busy} of them with requests in "
                     f"flight; memory {used_bytes} + {need_bytes} needed bytes against a budget of "
                     f"{budget or 'none'}")
    return out
