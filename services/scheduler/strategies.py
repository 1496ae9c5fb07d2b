"""Which engine gets the next request: routing strategies as pure functions over the worker table.

An engine's *effective* free slots are what it reported free minus the dispatches this
scheduler has sent it and not yet heard back about (``reserved``), so a burst of concurrent
dispatches never overfills an engine between two of its heartbeats. Every strategy chooses
only among *eligible* engines: live, not draining, not failed (their own health checks), not
excluded, circuit not open, and with an effective free slot; none ever sends to a full engine.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from schemas.routing import Strategy  # noqa: F401 - re-exported for the scheduler's modules
from services.common.worker_table import WorkerState

_NONE: Mapping[str, int] = {}


@dataclass(frozen=True)
class RoutingContext:
    """What a strategy may look at besides the engines themselves.

    ``turn`` counts this scheduler's choices (round robin, tie breaks); ``weights`` are per-worker
    overrides of the heartbeat ``weight``; ``response_times`` the dispatch round-trip averages;
    ``overlap`` how many leading prompt blocks of the request each engine served, out of
    ``blocks``; ``load_penalty`` the λ of prefix affinity's ``overlap - λ·load``.
    """

    reserved: Mapping[str, int] = field(default_factory=dict)
    turn: int = 0
    weights: Mapping[str, float] = field(default_factory=dict)
    response_times: Mapping[str, float] = field(default_factory=dict)
    overlap: Mapping[str, int] = field(default_factory=dict)
    blocks: int = 0
    load_penalty: float = 1.0
    rng: random.Random = field(default_factory=random.Random)


def effective_free(state: WorkerState, reserved: Mapping[str, int] = _NONE) -> int:
    """Slots of ``state`` free after this scheduler's unanswered dispatches to it (never negative)."""
    return max(0, state.free_slots - reserved.get(state.worker, 0))


def free_capacity(workers: Iterable[WorkerState], reserved: Mapping[str, int] = _NONE) -> int:
    """Total effective free slots over non-draining, not failed ``workers``: how much work may be taken now."""
    return sum(effective_free(s, reserved) for s in workers if not s.heartbeat.draining and not s.failed)


def eligible(candidates: Iterable[WorkerState], *, reserved: Mapping[str, int] = _NONE,
             exclude: Collection[str] = (), allows: Callable[[str], bool] = lambda _: True) -> list[WorkerState]:
    """Candidates that may get work now, sorted by worker id (see the module docstring)."""
    out = [s for s in candidates if not s.heartbeat.draining and not s.failed and s.worker not in exclude
           and effective_free(s, reserved) > 0 and allows(s.worker)]
    out.sort(key=lambda s: s.worker)
    return out


# An engine holding the request's adapter is preferred unless its load (a fraction of its slots) exceeds the
# least-loaded eligible engine's by more than this: loading an adapter costs about as much as a short request.
ADAPTER_LOAD_SLACK = 0.5


def prefer_adapter(workers: Sequence[WorkerState], adapter: str | None, reserved: Mapping[str, int] = _NONE,
                   slack: float = ADAPTER_LOAD_SLACK) -> list[WorkerState]:
    """The eligible ``workers`` that already have ``adapter`` loaded and are not much busier than the rest.

    Falls back to every worker when none holds the adapter, or when each holder is loaded more
    than ``slack`` (a fraction of its slots) above the least-loaded engine.
    """
    if not adapter:
        return list(workers)
    holders = [s for s in workers if adapter in s.heartbeat.adapters]
    if not holders:
        return list(workers)

    def busy(s: WorkerState) -> float:
        return (s.in_flight + reserved.get(s.worker, 0)) / max(1, s.heartbeat.slots)

    low = min(busy(s) for s in workers)
    near = [s for s in holders if busy(s) - low <= slack]
    return near or list(workers)


def _load(state: WorkerState, ctx: RoutingContext) -> int:
    return state.in_flight + ctx.reserved.get(state.worker, 0)


def _best(workers: Sequence[WorkerState], key: Callable[[WorkerState], tuple], turn: int) -> WorkerState | None:
    """The worker with the smallest ``key``; a tie is broken round robin by ``turn`` (``workers`` sorted by id)."""
    if not workers:
        return None
    keys = [key(s) for s in workers]
    low = min(keys)
    tied = [s for s, k in zip(workers, keys, strict=True) if k == low]
    return tied[turn % len(tied)]


# An engine whose decode speed (heartbeat ``tokens_per_second``, one stream) is under this fraction of the
# fastest eligible engine's gets work only while no faster engine has a free slot: a llama.cpp engine at 90
# tokens/s beside transformers at 15 takes every request it has room for. Engines within this factor of
# each other (the same engine on similar hosts) share by load. The speed falls as an engine fills up, so a
# loaded fast engine drops to the tier of the slow one and both are used.
SPEED_TIER = 0.5


def _speed(state: WorkerState) -> float:
    return state.heartbeat.tokens_per_second


def fastest(workers: Sequence[WorkerState], tier: float = SPEED_TIER) -> list[WorkerState]:
    """The eligible ``workers`` at least ``tier`` times as fast as the fastest one; an engine not measured yet
    is in (its first requests measure it). Eligible engines only have free slots, so a full fast engine
    leaves the slower ones the work: every slot is used under load."""
    known = [_speed(s) for s in workers if _speed(s) > 0]
    if not known:
        return list(workers)
    floor = max(known) * tier
    return [s for s in workers if _speed(s) <= 0 or _speed(s) >= floor]


def least_connections(workers: Sequence[WorkerState], ctx: RoutingContext) -> WorkerState | None:
    """Among the fastest engines (``fastest``): most effective free slots; then fewest requests in flight
    (reserved included); then round robin."""
    return _best(fastest(workers), lambda s: (-effective_free(s, ctx.reserved), _load(s, ctx)), ctx.turn)


def round_robin(workers: Sequence[WorkerState], ctx: RoutingContext) -> WorkerState | None:
    """Each eligible engine in turn, whatever its load."""
    return workers[ctx.turn % len(workers)] if workers else None


def _weight(state: WorkerState, ctx: RoutingContext) -> float:
    return ctx.weights.get(state.worker, state.heartbeat.weight)


def weighted(workers: Sequence[WorkerState], ctx: RoutingContext) -> WorkerState | None:
    """Load proportional to weight: the smallest (in flight + 1) / weight; weight <= 0 gets nothing."""
    positive = [s for s in workers if _weight(s, ctx) > 0]
    return _best(positive, lambda s: ((_load(s, ctx) + 1) / _weight(s, ctx),), ctx.turn)


def random_choice(workers: Sequence[WorkerState], ctx: RoutingContext) -> WorkerState | None:
    """Any eligible engine, uniformly at random (``ctx.rng``, seedable in tests)."""
    return ctx.rng.choice(workers) if workers else None


def response_time(workers: Sequence[WorkerState], ctx: RoutingContext) -> WorkerState | None:
    """The lowest dispatch round-trip average; an engine never measured counts as 0 (it gets tried)."""
    return _best(workers, lambda s: (ctx.response_times.get(s.worker, 0.0), _load(s, ctx)), ctx.turn)


def prefix_affinity(workers: Sequence[WorkerState], ctx: RoutingContext) -> WorkerState | None:
    """Highest ``overlap/blocks - λ·(in flight/slots)``; a tie goes to least connections.

    With no shared prefix this is least-loaded routing; with one, the engine holding the
    prefix wins unless it is loaded more than λ times the overlap fraction above another.
    """
    def key(s: WorkerState) -> tuple:
        share = ctx.overlap.get(s.worker, 0) / ctx.blocks if ctx.blocks else 0.0
        load = _load(s, ctx) / max(1, s.heartbeat.slots)
        return (-(share - ctx.load_penalty * load), -effective_free(s, ctx.reserved), _load(s, ctx))
    return _best(workers, key, ctx.turn)


STRATEGIES: dict[Strategy, Callable[[Sequence[WorkerState], RoutingContext], WorkerState | None]] = {
    Strategy.LEAST_CONNECTIONS: least_connections,
    Strategy.ROUND_ROBIN: round_robin,
    Strategy.WEIGHTED: weighted,
    Strategy.RANDOM: random_choice,
    Strategy.RESPONSE_TIME: response_time,
    Strategy.PREFIX_AFFINITY: prefix_affinity,
}


def choose(strategy: Strategy, workers: Sequence[WorkerState], ctx: RoutingContext) -> WorkerState | None:
    """The engine ``strategy`` picks among eligible ``workers`` (see ``eligible``), or None if there is none."""
    return STRATEGIES[strategy](workers, ctx)


def select_worker(candidates: Sequence[WorkerState], *, reserved: Mapping[str, int] = _NONE,
                  exclude: Collection[str] = (), turn: int = 0) -> WorkerState | None:
    """The least-loaded candidate with a free slot, or ``None`` if every one is full (``least_connections``)."""
    workers = eligible(candidates, reserved=reserved, exclude=exclude)
    return least_connections(workers, RoutingContext(reserved=reserved, turn=turn))
