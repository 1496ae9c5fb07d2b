"""The scheduler on a real nats-server, with the test playing the engines: routing and priority."""

from __future__ import annotations

import asyncio
import time

from schemas import names
from schemas.errors import ErrorCode
from schemas.events import encode
from schemas.inference import CancelRequest
from schemas.names import Lane
from tests.scheduler.test_scheduler_harness import (ReplyInbox, count, engines, eventually, known, new_request,  # noqa: F401
                                          start_scheduler, stream_messages, submit,
                                          until_stream_holds)


async def one_more_heartbeat(scheduler, engine) -> None:
    """Wait until the scheduler has handled a heartbeat of ``engine`` newer than the last one it had."""
    seen = scheduler.table.get(engine.worker).last_seen
    await eventually(lambda: scheduler.table.get(engine.worker).last_seen > seen, what="one more heartbeat")


async def test_request_goes_to_the_least_loaded_engine(nc, start_scheduler, engines):
    busy = await engines("busy", slots=4, in_flight=3)
    idle = await engines("idle", slots=4, in_flight=1)
    other = await engines("other", slots=4, in_flight=0, models=("another-model",))
    async with start_scheduler() as scheduler:
        await known(scheduler, busy, idle, other)
        req = await submit(nc, new_request())
        await eventually(lambda: idle.received_ids == [req.id], what="dispatch to the idle engine")
        await eventually(lambda: count(scheduler, "dispatched") == 1, what="the dispatch to be counted")
        assert busy.dispatch_requests == 0 and other.dispatch_requests == 0
        await until_stream_holds(nc, 0)  # acknowledged: gone from the work queue
        healthy = scheduler.metrics.registry.get_sample_value("llm_scheduler_workers_healthy")
        assert healthy == 3


async def test_high_priority_overtakes_queued_low_once_a_slot_frees(nc, start_scheduler, engines):
    engine = await engines("solo", slots=1, in_flight=1)
    async with start_scheduler() as scheduler:
        await known(scheduler, engine)
        lows = [await submit(nc, new_request(), "low") for _ in range(3)]
        high = await submit(nc, new_request(), "high")
        # The scheduler heard of all four (their doorbells woke its take loop) and, with no free slot, sent none.
        await eventually(lambda: scheduler.lanes.expected(Lane.LOW) >= 3 and scheduler.lanes.expected(Lane.HIGH) >= 1,
                         what="the scheduler to know of the queued requests")
        await one_more_heartbeat(scheduler, engine)  # which wakes the take loop: it planned again, with them known
        assert engine.dispatch_requests == 0
        order = [high.id] + [r.id for r in lows]
        for n in range(1, 5):
            await engine.finish()
            await eventually(lambda n=n: len(engine.received) == n, what=f"dispatch #{n} after a slot freed")
            await asyncio.sleep(0.05)
            assert len(engine.received) == n, "took more work than there were free slots"
        assert engine.received_ids == order


async def test_no_capacity_means_messages_stay_in_the_stream(nc, start_scheduler, engines):
    engine = await engines("full", slots=2, in_flight=2)
    async with start_scheduler() as scheduler:
        await known(scheduler, engine)
        for lane in ("high", "normal"):
            await submit(nc, new_request(), lane)
        await eventually(lambda: scheduler.lanes.expected(Lane.HIGH) >= 1 and scheduler.lanes.expected(Lane.NORMAL) >= 1,
                         what="the scheduler to know of the queued requests")
        await one_more_heartbeat(scheduler, engine)  # which wakes the take loop: it planned again, with them known
        assert engine.dispatch_requests == 0
        assert await stream_messages(nc) == 2
        for lane in ("high", "normal"):
            info = await nc.jetstream().consumer_info(names.INFER_STREAM, names.scheduler_durable(lane))
            assert (info.num_pending, info.num_ack_pending) == (1, 0), "a message was taken without a slot for it"
        await engine.finish(2)
        await eventually(lambda: len(engine.received) == 2, what="both dispatched once slots freed")


async def test_unknown_model_is_answered_with_model_not_found(nc, start_scheduler, engines):
    engine = await engines("e", slots=2)
    async with start_scheduler() as scheduler, ReplyInbox(nc) as inbox:
        await known(scheduler, engine)
        req = await submit(nc, new_request(model="no-such-model", reply_to=inbox.subject))
        error = await inbox.error()
        assert (error.id, error.code) == (req.id, ErrorCode.MODEL_NOT_FOUND)
        assert "no-such-model" in error.message
        assert engine.dispatch_requests == 0
        await eventually(lambda: count(scheduler, "model_not_found") == 1)
        await until_stream_holds(nc, 0)


async def test_deadline_passed_in_the_queue_is_a_timeout_never_a_dispatch(nc, start_scheduler, engines):
    engine = await engines("e", slots=1, in_flight=1)
    async with start_scheduler() as scheduler, ReplyInbox(nc) as inbox:
        await known(scheduler, engine)
        req = await submit(nc, new_request(reply_to=inbox.subject, deadline=time.time() + 0.3))
        await asyncio.sleep(0.4)
        await engine.finish()
        error = await inbox.error()
        assert (error.id, error.code) == (req.id, ErrorCode.TIMEOUT)
        await eventually(lambda: count(scheduler, "expired") == 1)  # it acted on the message: answered, not sent
        assert engine.dispatch_requests == 0


async def test_cancelled_while_queued_is_never_dispatched(nc, start_scheduler, engines):
    engine = await engines("e", slots=1, in_flight=1)
    async with start_scheduler() as scheduler:
        await known(scheduler, engine)
        doomed = await submit(nc, new_request())
        await nc.publish(names.INFER_CANCEL, encode(CancelRequest(id=doomed.id, reason="client went away")))
        kept = await submit(nc, new_request())
        await engine.finish()
        await eventually(lambda: engine.received_ids == [kept.id], what="the surviving request's dispatch")
        await eventually(lambda: count(scheduler, "cancelled") == 1)
        await until_stream_holds(nc, 0)


async def test_messages_queued_before_start_are_picked_up(nc, start_scheduler, engines):
    queued = [await submit(nc, new_request(), lane) for lane in ("low", "normal", "high")]
    engine = await engines("late", slots=8)
    async with start_scheduler():
        await eventually(lambda: len(engine.received) == 3, what="the backlog to be dispatched")
    assert sorted(engine.received_ids) == sorted(r.id for r in queued)


async def test_worker_table_starts_from_kv_and_skips_stale_entries(nc, js, start_scheduler, engines):
    fresh = await engines("kv-fresh", slots=2, heartbeat=False, interval=5.0)
    stale = await engines("kv-stale", slots=8, heartbeat=False)
    kv = await js.key_value(names.WORKERS_BUCKET)
    await kv.put(fresh.worker, encode(fresh.status()))
    old = stale.status()
    old.ts -= 10 * old.interval  # its engine died long ago; the TTL has not removed the entry yet
    await kv.put(stale.worker, encode(old))
    async with start_scheduler() as scheduler:
        assert scheduler.table.get(fresh.worker) is not None  # known before any heartbeat arrived
        assert scheduler.table.get(stale.worker) is None
        req = await submit(nc, new_request())
        await eventually(lambda: fresh.received_ids == [req.id], what="dispatch to the engine known from KV")


async def test_replicas_share_the_queue_and_dispatch_each_request_once(nc, start_scheduler, engines):
    a = await engines("a", slots=64)
    b = await engines("b", slots=64)
    async with start_scheduler() as s1, start_scheduler() as s2:
        await known(s1, a, b)
        await known(s2, a, b)
        reqs = [await submit(nc, new_request(), lane) for lane in ("high", "normal", "low") * 10]
        await eventually(lambda: len(a.received) + len(b.received) == len(reqs), what="all 30 dispatched")
        # Every request acknowledged (acks follow an engine's answer): none can be redelivered and
        # dispatched again, so the engines have seen all they ever will.
        await until_stream_holds(nc, 0)
        ids = a.received_ids + b.received_ids
        assert sorted(ids) == sorted(r.id for r in reqs)  # each exactly once


async def test_a_burst_is_taken_whole_without_the_periodic_queue_check(nc, start_scheduler, engines):
    # Doorbells can ring before the stream stores their message, so a fetch may come back short
    # or empty while messages are still arriving; with two replicas, one also fetches what the
    # other took. Neither may leave a message for the next periodic consumer-info check, switched
    # off here (an hour): short batches stay expected and an empty fetch asks the stream at once.
    a = await engines("a", slots=256)
    b = await engines("b", slots=256)
    async with start_scheduler(stats_interval=3600) as s1, start_scheduler(stats_interval=3600) as s2:
        await known(s1, a, b)
        await known(s2, a, b)
        for _ in range(3):
            reqs = await asyncio.gather(*(submit(nc, new_request()) for _ in range(60)))
            want = sorted(r.id for r in reqs)
            await eventually(lambda: want == sorted(set(a.received_ids + b.received_ids) & set(want)),
                             timeout=30, what="the whole burst dispatched")
        await until_stream_holds(nc, 0)
