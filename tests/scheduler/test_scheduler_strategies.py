"""Routing strategies, prefix index, response times and circuit breakers: pure, no NATS."""

from __future__ import annotations

import random
from collections import Counter

import msgspec

from schemas.heartbeat import EngineHeartbeat, ServedModel
from schemas.inference import ChatMessage, DispatchReply, InferenceRequest
from services.common.worker_table import WorkerState, WorkerTable
from services.scheduler.circuit import CircuitBreakers, CircuitState
from services.scheduler.placement import Placement
from services.scheduler.prefix_index import PrefixIndex, block_hashes
from services.scheduler.response_times import ResponseTimes
from services.scheduler.strategies import (RoutingContext, Strategy, choose, eligible, least_connections,
                                          prefix_affinity, random_choice, response_time, round_robin, weighted)
from services.scheduler.strategy_watch import parse_strategy


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def state(worker: str, *, slots: int = 4, in_flight: int = 0, weight: float = 1.0, draining: bool = False,
          models: tuple[str, ...] = ("m",)) -> WorkerState:
    hb = EngineHeartbeat(worker=worker, engine="t", device="cpu", models=[ServedModel(id=m) for m in models],
                         slots=slots, in_flight=in_flight, seq=1, ts=0.0, interval=1.0, draining=draining,
                         weight=weight)
    return WorkerState(heartbeat=hb, last_seen=0.0, in_flight=in_flight, seq=1)


def test_eligible_skips_full_draining_excluded_and_open_circuits():
    workers = [state("a"), state("full", in_flight=4), state("drain", draining=True), state("x"), state("open"),
               state("held", slots=1)]
    got = eligible(workers, reserved={"held": 1}, exclude={"x"}, allows=lambda w: w != "open")
    assert [s.worker for s in got] == ["a"]


def test_every_strategy_returns_none_when_nothing_is_eligible():
    for strategy in Strategy:
        assert choose(strategy, [], RoutingContext()) is None


def test_least_connections_prefers_free_slots_then_fewest_in_flight():
    workers = eligible([state("a", in_flight=3), state("b", in_flight=1), state("c", slots=2)])
    assert least_connections(workers, RoutingContext()).worker == "b"


def test_round_robin_cycles_whatever_the_load():
    workers = eligible([state("a", in_flight=3), state("b"), state("c")])
    picks = [round_robin(workers, RoutingContext(turn=t)).worker for t in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]


def test_weighted_shares_load_in_proportion_to_weight():
    heavy, light = state("heavy", slots=100, weight=3.0), state("light", slots=100, weight=1.0)
    reserved: dict[str, int] = {}
    for turn in range(40):
        pick = weighted(eligible([heavy, light], reserved=reserved), RoutingContext(reserved=reserved, turn=turn))
        reserved[pick.worker] = reserved.get(pick.worker, 0) + 1
    assert reserved == {"heavy": 30, "light": 10}


def test_weighted_config_overrides_heartbeat_and_zero_weight_gets_nothing():
    workers = eligible([state("a", weight=5.0), state("b", weight=1.0)])
    assert weighted(workers, RoutingContext(weights={"a": 0.0})).worker == "b"


def test_random_spreads_over_every_eligible_engine_and_is_seedable():
    workers = eligible([state("a"), state("b"), state("c")])
    rng = random.Random(42)
    picks = Counter(random_choice(workers, RoutingContext(rng=rng)).worker for _ in range(300))
    assert set(picks) == {"a", "b", "c"} and min(picks.values()) > 60


def test_response_time_prefers_the_fastest_and_tries_unmeasured_engines():
    workers = eligible([state("slow"), state("fast"), state("new")])
    times = {"slow": 0.5, "fast": 0.01}
    assert response_time(workers, RoutingContext(response_times=times)).worker == "new"
    times["new"] = 0.2
    assert response_time(workers, RoutingContext(response_times=times)).worker == "fast"


def test_response_times_are_a_moving_average():
    rt = ResponseTimes(alpha=0.5)
    rt.observe("a", 1.0)
    rt.observe("a", 0.0)
    assert rt.get("a") == 0.5 and rt.get("b") is None


def request(text: str) -> InferenceRequest:
    return InferenceRequest(id="r", model="m", reply_to="x", messages=[ChatMessage(role="user", content=text)])


def completion(text: str) -> InferenceRequest:
    return InferenceRequest(id="r", model="m", reply_to="x", prompt=text)


def test_prefix_index_counts_leading_blocks_served_by_each_engine():
    index = PrefixIndex(block_chars=4)
    shared = "abcdefgh"
    index.record(index.blocks(completion(shared + "1234")), "a")
    index.record(index.blocks(completion(shared[:4] + "zzzz")), "b")
    assert index.overlap(index.blocks(completion(shared + "1234xx"))) == {"b": 1, "a": 3}
    assert index.overlap(index.blocks(completion("qqqqqqqq"))) == {}
    index.forget("a")
    assert index.overlap(index.blocks(completion(shared + "1234"))) == {"b": 1}


def test_prefix_blocks_are_chained_and_the_lru_is_bounded():
    assert block_hashes("abcdabcd", 4)[0] != block_hashes("abcdabcd", 4)[1]
    assert block_hashes("abc", 4) == []
    index = PrefixIndex(block_chars=1, max_blocks=3)
    index.record(block_hashes("abcdef", 1), "w")
    assert len(index) == 3


def test_prefix_affinity_follows_the_prefix_but_not_onto_an_overloaded_engine():
    workers = eligible([state("holder", slots=10, in_flight=2), state("idle", slots=10)])
    ctx = RoutingContext(overlap={"holder": 8}, blocks=10, load_penalty=1.0)
    assert prefix_affinity(workers, ctx).worker == "holder"  # 0.8 - 0.2 beats 0 - 0
    loaded = eligible([state("holder", slots=10, in_flight=9), state("idle", slots=10)])
    assert prefix_affinity(loaded, ctx).worker == "idle"  # 0.8 - 0.9 loses to 0
    assert prefix_affinity(workers, RoutingContext(blocks=0)).worker == "idle"  # no prefix: least loaded


def test_placement_routes_a_shared_prefix_to_the_same_engine():
    table = WorkerTable(clock=lambda: 0.0)
    for w in ("a", "b", "c"):
        table.observe(state(w, slots=50).heartbeat)
    placement = Placement(table, strategy=Strategy.PREFIX_AFFINITY)
    system = "You are a helpful assistant. " * 20
    first = placement.reserve("m", request=request(system + "question one"))
    again = [placement.reserve("m", request=request(system + f"question {n}")) for n in range(5)]
    assert again == [first] * 5
    other = placement.reserve("m", request=request("completely different prompt " * 20))
    assert other != first


def test_circuit_opens_after_consecutive_failures_and_a_probe_closes_it():
    clock = Clock()
    breakers = CircuitBreakers(failures=3, cooldown=5.0, clock=clock)
    assert not breakers.failed("w") and not breakers.failed("w")
    breakers.succeeded("w")  # an answer resets the count
    assert [breakers.failed("w") for _ in range(3)] == [False, False, True]
    assert breakers.state("w") is CircuitState.OPEN and not breakers.allows("w") and breakers.open_count() == 1
    clock.now += 5.0
    assert breakers.state("w") is CircuitState.HALF_OPEN and breakers.allows("w")
    breakers.dispatched("w")  # the one probe
    assert not breakers.allows("w")
    breakers.succeeded("w")
    assert breakers.state("w") is CircuitState.CLOSED and breakers.allows("w") and breakers.open_count() == 0


def test_a_failed_probe_reopens_and_an_abandoned_one_may_be_retried():
    clock = Clock()
    breakers = CircuitBreakers(failures=1, cooldown=2.0, clock=clock)
    assert breakers.failed("w")
    clock.now += 2.0
    breakers.dispatched("w")
    breakers.abandoned("w")
    assert breakers.allows("w")
    breakers.dispatched("w")
    assert breakers.failed("w")
    assert breakers.state("w") is CircuitState.OPEN
    clock.now += 1.9
    assert not breakers.allows("w")
    clock.now += 0.1
    assert breakers.allows("w")


def test_placement_excludes_open_circuits_and_feeds_them_from_releases():
    clock = Clock()
    table = WorkerTable(clock=lambda: 0.0)
    table.observe(state("a", slots=8).heartbeat)
    table.observe(state("b", slots=8, in_flight=4).heartbeat)
    placement = Placement(table, breakers=CircuitBreakers(failures=2, cooldown=1.0, clock=clock))
    for opened in (False, True):
        worker = placement.reserve("m")
        assert worker == "a"
        assert placement.release(worker, failed=True) is opened
    assert placement.reserve("m") == "b"
    placement.release("b", DispatchReply(accepted=True, worker="b"), answered_in=0.01)
    clock.now += 1.0
    assert placement.reserve("m") == "a"  # half-open: the probe
    assert placement.reserve("m") == "b"  # only one probe at a time
    placement.release("a", DispatchReply(accepted=True, worker="a"))
    assert placement.breakers.open_count() == 0


def test_strategy_values_parse_leniently_and_unknown_ones_are_none():
    assert parse_strategy(b" Prefix_Affinity\n") is Strategy.PREFIX_AFFINITY
    assert parse_strategy(b"fastest") is None
    assert parse_strategy(b"\xff") is None


def test_a_failed_engine_is_never_chosen_by_any_strategy_and_counts_no_capacity():
    # The failed engine is the emptiest, fastest, heaviest one: every strategy would pick it if it could.
    clock = Clock()
    table = WorkerTable(clock=clock)
    broken = msgspec.structs.replace(state("a-broken", slots=100, weight=100.0).heartbeat, health="failed",
                                     health_reason="the vllm engine core died")
    table.observe(broken)
    table.observe(state("b-busy", slots=4, in_flight=3).heartbeat)
    assert [s.worker for s in table.candidates("m")] == ["b-busy"]
    for strategy in Strategy:
        placement = Placement(table, strategy=strategy, rng=random.Random(0))
        placement.response_times.observe("a-broken", 0.001)
        placement.response_times.observe("b-busy", 5.0)
        assert placement.capacity() == 1
        assert placement.reserve("m", request=request("same prefix")) == "b-busy", strategy
        placement.release("b-busy")
    assert [s.worker for s in eligible([WorkerState(heartbeat=broken, last_seen=0.0, in_flight=0, seq=1)])] == []
    table.observe(msgspec.structs.replace(broken, seq=2, health="ok", health_reason=""))  # its checks pass again
    assert {s.worker for s in table.candidates("m")} == {"a-broken", "b-busy"}
