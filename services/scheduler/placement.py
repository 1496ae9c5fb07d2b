"""Where work can go right now: the worker table plus this scheduler's own routing state.

No I/O. ``reserve`` picks an engine with the active strategy (``selection``) and counts the
dispatch against it until ``release`` (the engine answered, or did not), so concurrent
dispatches in a burst see each other and never overfill an engine between two heartbeats.
``release`` also feeds the circuit breakers and the response-time averages; ``reserve``
records the prompt's prefix blocks for ``prefix_affinity``.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping

from schemas.inference import DispatchReply, InferenceRequest
from services.common.worker_table import WorkerTable
from services.scheduler.circuit import CircuitBreakers, CircuitState
from services.scheduler.prefix_index import PrefixIndex
from services.scheduler.response_times import ResponseTimes
from services.scheduler.strategies import RoutingContext, Strategy, choose, eligible, free_capacity, prefer_adapter


class Placement:
    """Capacity accounting and engine choice over a ``WorkerTable``."""

    def __init__(self, table: WorkerTable, *, strategy: Strategy = Strategy.LEAST_CONNECTIONS,
                 breakers: CircuitBreakers | None = None, weights: Mapping[str, float] | None = None,
                 load_penalty: float = 1.0, rng: random.Random | None = None) -> None:
        self.table = table
        self.strategy = strategy
        self.breakers = breakers or CircuitBreakers(failures=3, cooldown=5.0)
        self.response_times = ResponseTimes()
        self.prefixes = PrefixIndex()
        self._weights = dict(weights or {})
        self._load_penalty = load_penalty
        self._rng = rng or random.Random()
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

    def canonical(self, model: str) -> str:
        """The canonical id of ``model`` (an alias resolved through the live engines), else ``model`` itself."""
        served = self.table.resolve(model)
        return served.id if served is not None else model

    def reserve(self, model: str, exclude: Collection[str] = (), request: InferenceRequest | None = None) -> str | None:
        """Pick an engine with a free slot for ``model`` by the active strategy and hold the slot; ``None`` if none."""
        workers = eligible(self.table.candidates(model), reserved=self._reserved, exclude=exclude,
                           allows=self.breakers.allows)
        if not workers:
            return None
        if request is not None and request.adapter:
            workers = prefer_adapter(workers, request.adapter, self._reserved)
        blocks = self.prefixes.blocks(request) if request is not None and \
            self.strategy is Strategy.PREFIX_AFFINITY else []
        ctx = RoutingContext(reserved=self._reserved, turn=self._turn, weights=self._weights,
                             response_times=self.response_times.snapshot()
                             if self.strategy is Strategy.RESPONSE_TIME else {},
                             overlap=self.prefixes.overlap(blocks) if blocks else {}, blocks=len(blocks),
                             load_penalty=self._load_penalty, rng=self._rng)
        state = choose(self.strategy, workers, ctx)
        if state is None:
            return None
        self._turn += 1
        self._reserved[state.worker] = self._reserved.get(state.worker, 0) + 1
        self.breakers.dispatched(state.worker)
        if blocks:
            self.prefixes.record(blocks, state.worker)
        return state.worker

    def circuit_states(self) -> dict[str, CircuitState]:
        """The breaker state of every live engine and of every engine with a breaker on record."""
        workers = {s.worker for s in self.table.live()}.union(self.breakers.tracked())
        return {worker: self.breakers.state(worker) for worker in workers}

    def forget(self, worker: str) -> None:
        """``worker`` is gone (nothing listens on its generate subject): stop choosing it until it heartbeats again."""
        self.table.remove(worker)
        self.prefixes.forget(worker)

    def release(self, worker: str, reply: DispatchReply | None = None, *, answered_in: float | None = None,
                failed: bool = False) -> bool:
        """The dispatch to ``worker`` is over; take the engine's own counts from ``reply`` if any.

        ``answered_in`` (seconds) feeds the response-time average; ``failed`` (no answer) counts
        toward its circuit breaker, an answer closes it. True if this opened the breaker.
        """
        if reply is not None:
            self.table.observe_dispatch(reply)
        left = self._reserved.get(worker, 0) - 1
        if left > 0:
            self._reserved[worker] = left
        else:
            self._reserved.pop(worker, None)
        if answered_in is not None:
            self.response_times.observe(worker, answered_in)
        if failed:
            return self.breakers.failed(worker)
        if reply is not None:
            self.breakers.succeeded(worker)
        else:  # not sent, or not needed (a cache hit): a half-open probe is still to be made
            self.breakers.abandoned(worker)
        return False
