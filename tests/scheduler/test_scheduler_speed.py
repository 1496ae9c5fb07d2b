"""The default strategy prefers the faster engine serving a model, and still uses every slot under load. Pure."""

from __future__ import annotations

from collections import Counter

import msgspec

from schemas.heartbeat import EngineHeartbeat, ServedModel
from schemas.inference import DispatchReply
from services.common.worker_table import WorkerState, WorkerTable
from services.engine.heartbeats import DecodeSpeed
from services.scheduler.placement import Placement
from services.scheduler.strategies import RoutingContext, eligible, fastest, least_connections


def beat(worker: str, tokens_per_second: float, *, slots: int = 4, in_flight: int = 0) -> EngineHeartbeat:
    return EngineHeartbeat(worker=worker, engine="t", device="cpu", models=[ServedModel(id="m")], slots=slots,
                           in_flight=in_flight, seq=1, ts=0.0, interval=1.0, tokens_per_second=tokens_per_second)


def state(worker: str, tokens_per_second: float, **kw) -> WorkerState:
    hb = beat(worker, tokens_per_second, **kw)
    return WorkerState(heartbeat=hb, last_seen=0.0, in_flight=hb.in_flight, seq=1)


def test_the_faster_engine_gets_the_work_even_when_the_slower_is_emptier():
    workers = eligible([state("llamacpp", 90.0, in_flight=3), state("transformers", 15.0)])
    assert [s.worker for s in fastest(workers)] == ["llamacpp"]
    assert least_connections(workers, RoutingContext()).worker == "llamacpp"


def test_engines_of_about_the_same_speed_share_by_load():
    workers = eligible([state("a", 80.0, in_flight=3), state("b", 60.0, in_flight=1)])
    assert least_connections(workers, RoutingContext()).worker == "b"


def test_an_engine_not_measured_yet_is_tried():
    workers = eligible([state("new", 0.0), state("slow", 15.0, in_flight=2)])
    assert least_connections(workers, RoutingContext()).worker == "new"


def test_placement_fills_the_fast_engine_first_then_the_slow_one():
    table = WorkerTable(clock=lambda: 0.0)
    table.observe(beat("fast", 90.0, slots=4))
    table.observe(beat("slow", 15.0, slots=4))
    placement = Placement(table)  # the default strategy

    picks = [placement.reserve("m") for _ in range(8)]

    assert picks[:4] == ["fast"] * 4, "the fast engine takes every request it has a slot for"
    assert Counter(picks[4:]) == {"slow": 4}, "the slow engine is not starved once the fast one is full"
    assert placement.reserve("m") is None and placement.capacity() == 0
    for n in range(4):  # the fast engine accepted all four, then finished one
        placement.release("fast", DispatchReply(accepted=True, worker="fast", in_flight=n + 1, slots=4,
                                                status_seq=2 + n))
    table.observe(msgspec.structs.replace(beat("fast", 90.0, slots=4, in_flight=3), seq=9))
    assert placement.reserve("m") == "fast", "a slot freed on the fast engine is used before anything else"


def test_decode_speed_is_a_moving_average_of_finished_streams():
    speed = DecodeSpeed(alpha=0.5)
    assert speed.tokens_per_second == 0.0
    speed.observe(0, 1.0)  # one token: no decode step to time
    assert speed.tokens_per_second == 0.0
    speed.observe(90, 1.0)
    assert speed.tokens_per_second == 90.0
    speed.observe(30, 1.0)
    assert speed.tokens_per_second == 60.0
