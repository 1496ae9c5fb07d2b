"""Engine choice and capacity accounting: pure, no NATS."""

from __future__ import annotations

from schemas.heartbeat import EngineHeartbeat, ServedModel
from schemas.inference import DispatchReply
from services.common.worker_table import WorkerState, WorkerTable
from services.scheduler.placement import Placement
from services.scheduler.strategies import free_capacity, select_worker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def hb(worker: str, *, slots: int = 4, in_flight: int = 0, models: tuple[str, ...] = ("m",), seq: int = 1,
       draining: bool = False) -> EngineHeartbeat:
    return EngineHeartbeat(worker=worker, engine="t", device="cpu", models=[ServedModel(id=m) for m in models],
                           slots=slots, in_flight=in_flight, seq=seq, ts=0.0, interval=1.0, draining=draining)


def state(worker: str, **kw) -> WorkerState:
    beat = hb(worker, **kw)
    return WorkerState(heartbeat=beat, last_seen=0.0, in_flight=beat.in_flight, seq=beat.seq)


def test_most_free_slots_wins():
    chosen = select_worker([state("a", slots=4, in_flight=3), state("b", slots=4, in_flight=1),
                            state("c", slots=2, in_flight=0)])
    assert chosen is not None and chosen.worker == "b"


def test_tie_on_free_slots_goes_to_fewest_in_flight():
    chosen = select_worker([state("big", slots=8, in_flight=6), state("small", slots=2, in_flight=0)])
    assert chosen is not None and chosen.worker == "small"


def test_full_tie_is_round_robin_by_turn():
    cands = [state("b"), state("a"), state("c")]
    picks = [select_worker(cands, turn=t).worker for t in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]


def test_reserved_dispatches_count_against_an_engine():
    cands = [state("a", slots=4, in_flight=0), state("b", slots=4, in_flight=1)]
    assert select_worker(cands).worker == "a"
    assert select_worker(cands, reserved={"a": 2}).worker == "b"
    assert select_worker(cands, reserved={"a": 4, "b": 3}) is None


def test_full_draining_and_excluded_engines_are_never_chosen():
    cands = [state("full", slots=2, in_flight=2), state("drain", draining=True), state("x")]
    assert select_worker(cands, exclude={"x"}) is None
    assert select_worker(cands).worker == "x"
    assert select_worker([]) is None


def test_free_capacity_sums_effective_free_slots_of_non_draining_engines():
    workers = [state("a", slots=4, in_flight=1), state("b", slots=2, in_flight=2), state("d", draining=True)]
    assert free_capacity(workers) == 3
    assert free_capacity(workers, {"a": 2}) == 1
    assert free_capacity(workers, {"a": 9}) == 0


def test_placement_reserves_until_the_engine_answers():
    table = WorkerTable(clock=Clock())
    table.observe(hb("a", slots=2, in_flight=0, seq=1))
    placement = Placement(table)
    assert placement.capacity() == 2
    assert placement.reserve("m") == "a"
    assert placement.reserve("m") == "a"
    assert placement.capacity() == 0
    assert placement.reserve("m") is None
    # The engine accepted the first one: its own count replaces the reservation.
    placement.release("a", DispatchReply(accepted=True, worker="a", in_flight=1, slots=2, status_seq=2))
    assert placement.capacity() == 0
    placement.release("a", DispatchReply(accepted=False, worker="a", in_flight=1, slots=2, status_seq=3))
    assert placement.capacity() == 1
    assert placement.reserved == {}


def test_placement_knows_which_models_are_served_and_forgets_gone_engines():
    clock = Clock()
    table = WorkerTable(clock=clock)
    table.observe(hb("a", models=("m",)))
    table.observe(hb("d", models=("only-draining",), draining=True))
    placement = Placement(table)
    assert placement.serves("m") and placement.serves("only-draining") and not placement.serves("other")
    assert placement.reserve("only-draining") is None  # draining engines get no new work
    assert placement.reserve("other") is None
    placement.forget("a")
    assert not placement.serves("m")
    clock.now += 3.5  # three intervals: "d" is dead too
    assert not placement.serves("only-draining")
