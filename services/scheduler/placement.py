"""Where work can go right now: the worker table plus this scheduler's unanswered dispatches.

No I/O. ``reserve`` picks an engine with ``select_worker`` and counts the dispatch against it
until ``release`` (the engine answered, or did not), so concurrent dispatches in a burst see
each other and never overfill an engine between two heartbeats.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from schemas.inference import DispatchReply
from services.common.worker_table import WorkerTable
from services.scheduler.selection import free_capacity, select_worker


class Placement:
    """Capacity accounting and engine choice over a ``WorkerTable``."""

    def __init__(self, table: WorkerTable) -> None:
        self.table = table
        self._reserved: dict[str, int] = {}
        self._turn = 0

    @property
    def reserved(self) -> Mapping[str, int]:
        """Dispatches sent to each engine and not yet answered."""
        return self._reserved

    def capacity(self) -> int:
        """Free slots over every live, non-draining engine, net of unanswered dispatches."""
        return free_capacity(self.table.live(), self._reserved)

    def serves(self, model: str) -> bool:
        """Whether any live engine has ``model`` loaded (draining ones included: they may return)."""
        return any(s.serves(model) for s in self.table.live())

    def reserve(self, model: str, exclude: Collection[str] = ()) -> str | None:
        """Pick the least-loaded engine with a free slot for ``model`` and hold the slot; ``None`` if none."""
        state = select_worker(self.table.candidates(model), reserved=self._reserved, exclude=exclude,
                              turn=self._turn)
        if state is None:
            return None
        self._turn += 1
        self._reserved[state.worker] = self._reserved.get(state.worker, 0) + 1
        return state.worker

    def forget(self, worker: str) -> None:
        """``worker`` is gone (nothing listens on its generate subject): stop choosing it until it heartbeats again."""
        self.table.remove(worker)

    def release(self, worker: str, reply: DispatchReply | None = None) -> None:
        """The dispatch to ``worker`` is over; take the engine's own counts from ``reply`` if any."""
        if reply is not None:
            self.table.observe_dispatch(reply)
        left = self._reserved.get(worker, 0) - 1
        if left > 0:
            self._reserved[worker] = left
        else:
            self._reserved.pop(worker, None)
