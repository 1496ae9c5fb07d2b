"""Requests an engine accepted from this replica, for producers that do not watch heartbeats. Pure: no I/O.

The edge follows the engine of each of its requests itself (and migrates a request whose engine
died), so it marks its requests ``producer_watches``. A NATS-native producer does not: without
this table it would learn of a dead engine only at its own deadline. The scheduler replica that
saw the accept remembers (request, engine, reply subject, dispatch number) until the request's
deadline; when the engine misses three heartbeats, ``lost`` hands the entries back so the
scheduler can end each with a ``worker_lost`` error. The scheduler does not see a
request end, so an entry may outlive its request: the producer ignores events after the terminal one.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass

from schemas.inference import InferenceRequest
from services.common.worker_table import WorkerState, WorkerTable

# Most requests remembered at once; past it the one due to expire first is dropped (not covered).
DEFAULT_LIMIT = 100_000
# How long a request without a deadline is remembered (seconds).
NO_DEADLINE_HORIZON = 3600.0


@dataclass(frozen=True, slots=True)
class Running:
    """One accepted request: where its producer listens and which offer the engine runs."""

    request_id: str
    worker: str
    reply_to: str
    dispatch: int
    expires: float  # Unix time: the request's deadline, or NO_DEADLINE_HORIZON after it was accepted


class RunningRequests:
    """Accepted requests by engine, bounded in count and dropped at their deadline.

    Each engine's last known ``WorkerState`` is kept while it has requests here, so an engine the
    worker table dropped (expired, or forgotten after a failed dispatch) is still judged by its
    own last heartbeat: dead once it is three intervals old.
    """

    def __init__(self, *, limit: int = DEFAULT_LIMIT, clock: Callable[[], float] = time.time) -> None:
        self._limit = limit
        self._clock = clock
        self._by_id: dict[str, Running] = {}
        self._by_worker: dict[str, dict[str, Running]] = {}
        self._last_seen: dict[str, WorkerState] = {}
        self._due: list[tuple[float, str]] = []  # (expires, request id); stale pairs are skipped lazily

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._by_id

    def add(self, req: InferenceRequest, worker: str, dispatch: int, state: WorkerState | None) -> None:
        """Remember that ``worker`` accepted offer ``dispatch`` of ``req`` (``state``: its table entry now)."""
        now = self._clock()
        expires = req.deadline if req.deadline else now + NO_DEADLINE_HORIZON
        if expires <= now:
            return
        self.discard(req.id)
        run = Running(req.id, worker, req.reply_to, dispatch, expires)
        self._by_id[req.id] = run
        self._by_worker.setdefault(worker, {})[req.id] = run
        if state is not None:
            self._last_seen[worker] = state
        heapq.heappush(self._due, (expires, req.id))
        while len(self._by_id) > self._limit:
            self._pop_due()
        if len(self._due) > 2 * self._limit + 64:  # many entries left early (cancel, lost): rebuild the heap
            self._due = [(r.expires, r.request_id) for r in self._by_id.values()]
            heapq.heapify(self._due)

    def discard(self, request_id: str) -> None:
        """Forget ``request_id`` (cancelled by its producer, or offered again); no-op if unknown."""
        run = self._by_id.pop(request_id, None)
        if run is None:
            return
        mine = self._by_worker.get(run.worker)
        if mine is not None:
            mine.pop(request_id, None)
            if not mine:
                del self._by_worker[run.worker]
                self._last_seen.pop(run.worker, None)

    def lost(self, table: WorkerTable) -> list[Running]:
        """Forget and return every request whose engine is dead; drop those past their deadline first."""
        now = self._clock()
        while self._due and self._due[0][0] <= now:
            self._drop(*heapq.heappop(self._due))
        out: list[Running] = []
        for worker in list(self._by_worker):
            state = table.get(worker)
            if state is not None:
                self._last_seen[worker] = state
            else:
                state = self._last_seen.get(worker)
            if state is None or table.silent_too_long(state):
                out.extend(self._by_worker.pop(worker).values())
                self._last_seen.pop(worker, None)
        for run in out:
            del self._by_id[run.request_id]
        return out

    def _pop_due(self) -> None:
        """Drop the entry that expires first (skipping heap pairs of entries already gone or replaced)."""
        while self._due:
            if self._drop(*heapq.heappop(self._due)):
                return

    def _drop(self, expires: float, request_id: str) -> bool:
        """Forget ``request_id`` if the heap pair ``(expires, request_id)`` is still its entry's."""
        run = self._by_id.get(request_id)
        if run is None or run.expires != expires:
            return False
        self.discard(request_id)
        return True
