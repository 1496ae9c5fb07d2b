"""Strict-priority take planning and remembered ids: pure, no NATS."""

from __future__ import annotations

from schemas.names import Lane
from services.scheduler.lanes import LaneBook
from services.common.recent import RecentIds

HIGH, NORMAL, LOW = Lane.HIGH, Lane.NORMAL, Lane.LOW


def book(max_batch: int = 8, starvation_limit: int = 0) -> LaneBook:
    b = LaneBook(fetch_wait=0.05, probe_wait=0.005, max_batch=max_batch, starvation_limit=starvation_limit)
    for _ in (HIGH, NORMAL, LOW):  # start-up probes found every lane empty
        b.settle(b.plan(1), 0)
    return b


def test_startup_probes_every_lane_highest_first():
    b = LaneBook(fetch_wait=0.05, probe_wait=0.005, max_batch=8)
    seen = []
    while (take := b.plan(4)) is not None:
        assert take.batch == 1 and take.wait == 0.005
        seen.append(take.lane)
        b.settle(take, 0)
    assert seen == [HIGH, NORMAL, LOW]


def test_nothing_is_taken_without_capacity_or_without_work():
    b = book()
    assert b.plan(5) is None
    b.ring(LOW)
    assert b.plan(0) is None
    assert b.plan(1).lane == LOW


def test_highest_non_empty_lane_first_and_never_more_than_free_slots():
    b = book()
    for _ in range(3):
        b.ring(LOW)
    b.ring(HIGH)
    take = b.plan(5)
    assert (take.lane, take.batch, take.wait) == (HIGH, 1, 0.05)
    b.settle(take, 1, num_pending=0)
    take = b.plan(2)
    assert (take.lane, take.batch) == (LOW, 2)
    b.settle(take, 2, num_pending=1)
    take = b.plan(2)
    assert (take.lane, take.batch) == (LOW, 1)


def test_batch_is_capped_by_max_batch():
    b = book(max_batch=4)
    for _ in range(10):
        b.ring(NORMAL)
    assert b.plan(100).batch == 4


def test_doorbells_during_a_fetch_are_not_lost():
    b = book()
    b.ring(NORMAL)
    take = b.plan(4)
    b.ring(NORMAL)  # published while the fetch was out; perhaps not yet counted in num_pending
    b.settle(take, 1, num_pending=0)
    assert b.plan(4).lane == NORMAL
    take = b.plan(4)
    b.ring(NORMAL)  # rang during a fetch that came back empty (stored a hair later)
    b.settle(take, 0)
    assert b.plan(4).lane == NORMAL


def test_rung_messages_the_fetch_did_not_find_stay_expected():
    # Ten doorbells, but the no-wait fetch found only three stored: the others were stored a
    # moment later, and JetStream's num_pending (0 at the third) cannot count them.
    b = book(max_batch=8)
    for _ in range(10):
        b.ring(NORMAL)
    take = b.plan(16)
    assert take.batch == 8
    b.settle(take, 3, num_pending=0)
    follow_up = b.plan(16)
    assert (follow_up.lane, follow_up.batch, follow_up.wait) == (NORMAL, 7, 0.05)
    b.settle(follow_up, 7, num_pending=0)
    assert b.plan(16) is None


def test_an_empty_fetch_clears_the_estimate():
    b = book()
    b.ring(HIGH)
    b.settle(b.plan(1), 0)  # another replica took it
    assert b.plan(1) is None


def test_num_pending_is_authoritative_after_a_fetch():
    b = book()
    b.ring(HIGH)
    b.settle(b.plan(1), 1, num_pending=7)
    assert b.expected(HIGH) == 7


def test_a_full_batch_of_redeliveries_keeps_the_lane_suspect():
    b = book()
    b.sweep()
    take = b.plan(3)
    assert (take.lane, take.wait) == (HIGH, 0.005)
    b.settle(take, 1, num_pending=0, redelivered=True)
    assert b.plan(3).lane == HIGH  # more redeliveries may be queued behind it
    b.settle(b.plan(3), 1, num_pending=0, redelivered=False)
    assert b.plan(3).lane == NORMAL  # the sweep still probes the other lanes


def test_deferred_messages_are_expected_when_due_and_hints_only_raise():
    b = book()
    b.expect(LOW)
    assert (b.plan(1).lane, b.plan(1).wait) == (LOW, 0.05)
    assert b.hint(NORMAL, 3) is True
    assert b.hint(NORMAL, 1) is False
    assert b.plan(9).lane == NORMAL and b.plan(9).batch == 3


def test_recent_ids_forget_after_ttl_and_beyond_max_size():
    now = [0.0]
    ids = RecentIds(10.0, max_size=3, clock=lambda: now[0])
    ids.add("a")
    now[0] = 5.0
    ids.add("b")
    assert "a" in ids and "b" in ids and "c" not in ids
    now[0] = 10.5
    assert "a" not in ids and "b" in ids
    for x in ("c", "d", "e"):
        ids.add(x)
    assert len(ids) == 3 and "b" not in ids


def _serve_one(b: LaneBook, backlog: dict) -> Lane:
    """Plan one message (one free slot) against a simulated backlog and settle the fetch."""
    take = b.plan(1)
    backlog[take.lane] -= 1
    b.settle(take, 1, num_pending=backlog[take.lane])
    return take.lane


def test_strict_priority_starves_the_low_lane_under_sustained_high_load():
    b = book(starvation_limit=0)
    backlog = {HIGH: 0, NORMAL: 0, LOW: 5}
    b.hint(LOW, 5)
    served = []
    for _ in range(100):  # a new high-priority request arrives for every one served
        backlog[HIGH] += 1
        b.ring(HIGH)
        served.append(_serve_one(b, backlog))
    assert LOW not in served


def test_starvation_guard_lets_the_low_lane_progress():
    b = book(starvation_limit=4)
    backlog = {HIGH: 0, NORMAL: 0, LOW: 5}
    b.hint(LOW, 5)
    served = []
    for _ in range(25):
        backlog[HIGH] += 1
        b.ring(HIGH)
        served.append(_serve_one(b, backlog))
    # One low message after every four high ones, and high still gets most of the capacity.
    assert served[:5] == [HIGH, HIGH, HIGH, HIGH, LOW]
    assert served.count(LOW) == 5 and served.count(HIGH) == 20
