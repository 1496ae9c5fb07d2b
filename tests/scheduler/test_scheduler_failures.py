"""The scheduler when engines fail, refuse or fall silent, and when messages come back."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import msgspec

from nats.micro.service import ServiceVerb, control_subject

from schemas import names
from schemas.errors import ErrorCode
from schemas.inference import CancelRequest
from services.scheduler.status import STATUS_SUBJECT
from tests.scheduler.test_scheduler_harness import (INTERVAL, ReplyInbox, count, engines, eventually, known,  # noqa: F401
                                          new_request, start_scheduler, stream_messages, submit,
                                          until_stream_holds)


async def test_an_engine_that_stops_heartbeating_gets_no_work_after_three_intervals(nc, start_scheduler, engines):
    silent = await engines("silent", slots=8)  # the emptier one: it would win every choice
    alive = await engines("alive", slots=4)
    async with start_scheduler() as scheduler:
        await known(scheduler, silent, alive)
        await silent.stop_heartbeats()  # still answers dispatches: only the heartbeats prove liveness
        # Three intervals without a heartbeat: the scheduler counts it dead (by its own table, not our clock).
        await eventually(lambda: not scheduler.table.is_alive(silent.worker), what="the silent engine to be dead")
        reqs = [await submit(nc, new_request()) for _ in range(3)]
        await eventually(lambda: len(alive.received) == 3, what="all requests on the live engine")
        assert silent.dispatch_requests == 0
        assert alive.received_ids == [r.id for r in reqs]
        # Dropped from the table by the periodic expiry, which may come after the requests.
        await eventually(lambda: scheduler.table.get(silent.worker) is None, what="the silent engine expired")
        assert scheduler.metrics.registry.get_sample_value("llm_scheduler_workers_healthy") == 1


async def test_a_busy_answer_sends_the_request_to_another_engine(nc, start_scheduler, engines):
    liar = await engines("liar", slots=8)  # advertises free slots, answers busy
    liar.busy = True
    spare = await engines("spare", slots=2)
    async with start_scheduler() as scheduler:
        await known(scheduler, liar, spare)
        req = await submit(nc, new_request())
        await eventually(lambda: spare.received_ids == [req.id], what="the retry on the spare engine")
        assert liar.dispatch_requests == 1 and not liar.received
        await eventually(lambda: count(scheduler, "dispatched") == 1)
        await until_stream_holds(nc, 0)


async def test_an_engine_that_does_not_answer_in_time_has_the_offer_withdrawn_before_the_next_one(
        nc, start_scheduler, engines):
    # A hung engine may still read the offer later; the withdrawal tells it not to run it, and the
    # next engine's offer carries a larger number, so a late accept's events are told apart by producers.
    hung = await engines("hung", slots=8)  # the emptier one: offered the request first
    hung.silent = True
    spare = await engines("spare", slots=2)
    # One subscription sees the scheduler's messages to both engines in the order it sent them (separate
    # subscriptions each have their own callback task, so their relative order would prove nothing).
    seen: list[tuple[str, bytes]] = []
    watched = {names.engine_cancel(hung.worker), names.engine_generate(spare.worker)}

    async def on_engine_subject(msg) -> None:
        if msg.subject in watched:
            seen.append((msg.subject, msg.data))

    await nc.subscribe(f"{names.ROOT}.engine.>", cb=on_engine_subject)
    async with start_scheduler(dispatch_timeout=0.3) as scheduler:
        await known(scheduler, hung, spare)
        req = await submit(nc, new_request())
        await eventually(lambda: spare.received_ids == [req.id], what="the offer to the spare engine")
        await eventually(lambda: len(seen) == 2, what="the withdrawal and the next offer")
        (first, data), (second, _) = seen
        assert (first, second) == (names.engine_cancel(hung.worker), names.engine_generate(spare.worker))
        cancel = msgspec.json.decode(data, type=CancelRequest)  # withdrawn before the next engine was offered it
        assert (cancel.id, cancel.dispatch, cancel.reason) == (req.id, 0, "dispatch_timeout")
        assert hung.dispatch_requests == 1 and spare.received[0].dispatch == 1


async def test_a_vanished_engine_is_skipped_at_once(nc, start_scheduler, engines):
    ghost = await engines("ghost", slots=8)
    spare = await engines("spare", slots=2)
    async with start_scheduler() as scheduler:
        await known(scheduler, ghost, spare)
        await ghost.stop()  # process gone, its last heartbeat still fresh: no responders
        req = await submit(nc, new_request())
        await eventually(lambda: spare.received_ids == [req.id], what="the dispatch to the remaining engine")
        assert scheduler.table.get(ghost.worker) is None


async def test_when_no_engine_can_take_it_the_request_waits_in_the_queue(nc, start_scheduler, engines):
    engine = await engines("stubborn", slots=1)
    engine.busy = True
    async with start_scheduler() as scheduler:
        await known(scheduler, engine)
        req = await submit(nc, new_request())
        await eventually(lambda: count(scheduler, "deferred") >= 2, what="the request to be deferred and retried")
        assert await stream_messages(nc) == 1  # handed back, not failed
        engine.busy = False
        await eventually(lambda: engine.received_ids == [req.id], what="the dispatch once the engine had room")
        await until_stream_holds(nc, 0)


async def test_an_engine_refusing_the_request_itself_is_reported_to_the_client(nc, start_scheduler, engines):
    a = await engines("a", slots=2)
    b = await engines("b", slots=2)
    a.refusal = b.refusal = ErrorCode.CONTEXT_LENGTH_EXCEEDED
    async with start_scheduler() as scheduler, ReplyInbox(nc) as inbox:
        await known(scheduler, a, b)
        req = await submit(nc, new_request(reply_to=inbox.subject))
        error = await inbox.error()
        assert (error.id, error.code) == (req.id, ErrorCode.CONTEXT_LENGTH_EXCEEDED)
        assert a.dispatch_requests + b.dispatch_requests == 1  # not retried: it would fail anywhere
        await eventually(lambda: count(scheduler, "refused") == 1)


async def test_an_unsupported_request_goes_to_an_engine_that_supports_it(nc, start_scheduler, engines):
    """Engines differ in what they serve (a DoRA adapter on llama.cpp, logprobs on MLX): ``unsupported`` from
    one engine sends the request to the next; only when every engine tried refuses is it reported."""
    narrow = await engines("narrow", slots=8)  # the emptier one: offered first
    narrow.refusal = ErrorCode.UNSUPPORTED
    wide = await engines("wide", slots=2)
    async with start_scheduler() as scheduler, ReplyInbox(nc) as inbox:
        await known(scheduler, narrow, wide)
        req = await submit(nc, new_request())
        await eventually(lambda: wide.received_ids == [req.id], what="the request on the engine that supports it")
        assert narrow.dispatch_requests == 1
        wide.refusal = ErrorCode.UNSUPPORTED
        await wide.finish()
        other = await submit(nc, new_request(reply_to=inbox.subject))
        error = await inbox.error()
        assert (error.id, error.code) == (other.id, ErrorCode.UNSUPPORTED)
        assert narrow.dispatch_requests == 2 and wide.dispatch_requests == 2
        await eventually(lambda: count(scheduler, "refused") == 1)
        await until_stream_holds(nc, 0)


async def test_a_malformed_message_is_terminated_with_invalid_request(nc, start_scheduler, engines):
    engine = await engines("e", slots=2)
    async with start_scheduler() as scheduler, ReplyInbox(nc) as inbox:
        await known(scheduler, engine)
        body = json.dumps({"id": "bad-1", "model": 7, "reply_to": inbox.subject}).encode()
        await nc.jetstream().publish(names.infer_submit("high"), body)
        error = await inbox.error()
        assert (error.id, error.code) == ("bad-1", ErrorCode.INVALID_REQUEST)
        assert engine.dispatch_requests == 0
        await eventually(lambda: count(scheduler, "invalid", "high") == 1)
        await until_stream_holds(nc, 0)


async def test_a_request_id_already_accepted_is_not_dispatched_again(nc, start_scheduler, engines):
    engine = await engines("e", slots=4)
    async with start_scheduler() as scheduler:
        await known(scheduler, engine)
        req = await submit(nc, new_request())
        await eventually(lambda: engine.received_ids == [req.id])
        await submit(nc, req)  # the same request again: a producer retry past the dedupe window
        await eventually(lambda: count(scheduler, "duplicate") == 1, what="the copy to be recognised")
        assert engine.dispatch_requests == 1
        await until_stream_holds(nc, 0)


async def test_a_redelivery_during_a_slow_dispatch_is_not_dispatched_twice(nc, js, start_scheduler, engines):
    # Shorten ack_wait on this test's own server so JetStream redelivers while the engine is slow to answer.
    info = await js.consumer_info(names.INFER_STREAM, names.scheduler_durable("normal"))
    await js.add_consumer(names.INFER_STREAM, dataclasses.replace(info.config, ack_wait=0.4))
    engine = await engines("slow", slots=4)
    engine.reply_delay = 0.9
    async with start_scheduler(dispatch_timeout=2.0) as scheduler:
        await known(scheduler, engine)
        first = await submit(nc, new_request())
        await asyncio.sleep(0.6)  # ack_wait is over: the first request is due for redelivery
        second = await submit(nc, new_request())  # the next fetch from the lane brings the redelivery first
        await eventually(lambda: engine.received_ids == [first.id, second.id], timeout=4.0)
        await until_stream_holds(nc, 0)
        info = await js.consumer_info(names.INFER_STREAM, names.scheduler_durable("normal"))
        assert info.delivered.consumer_seq >= 3, "the test did not provoke a redelivery"
        # The queue is empty, so nothing is left to redeliver, and a request is acknowledged only after its
        # dispatch was answered: every dispatch there will be has reached the engine.
        assert engine.dispatch_requests == 2


async def test_a_message_taken_by_a_replica_that_died_is_dispatched_after_ack_wait(nc, js, start_scheduler,
                                                                                   engines):
    info = await js.consumer_info(names.INFER_STREAM, names.scheduler_durable("low"))
    await js.add_consumer(names.INFER_STREAM, dataclasses.replace(info.config, ack_wait=0.5))
    req = await submit(nc, new_request(), "low")
    dead_replica = await js.pull_subscribe_bind(durable=names.scheduler_durable("low"), stream=names.INFER_STREAM)
    assert len(await dead_replica.fetch(1, timeout=2)) == 1  # taken, never acknowledged
    await dead_replica.unsubscribe()
    engine = await engines("e", slots=2)
    async with start_scheduler(stats_interval=0.2):
        # No doorbell rings for a redelivery: consumer info shows it (more pending acks than held).
        await eventually(lambda: engine.received_ids == [req.id], timeout=4.0, what="the redelivered request")
        await until_stream_holds(nc, 0)


async def test_a_redelivered_message_an_engine_already_accepted_is_not_dispatched_again(nc, js, start_scheduler,
                                                                                      engines):
    # A replica died between the engine's accept and its ack: the engine runs the request, JetStream
    # redelivers it to another replica, which must not start it a second time (on any engine).
    info = await js.consumer_info(names.INFER_STREAM, names.scheduler_durable("normal"))
    await js.add_consumer(names.INFER_STREAM, dataclasses.replace(info.config, ack_wait=0.5))
    runner = await engines("runner", slots=4)
    other = await engines("other", slots=8)  # emptier: a blind re-dispatch would pick it
    req = await submit(nc, new_request())
    dead_replica = await js.pull_subscribe_bind(durable=names.scheduler_durable("normal"), stream=names.INFER_STREAM)
    [taken] = await dead_replica.fetch(1, timeout=2)
    await nc.request(names.engine_generate(runner.worker), taken.data, timeout=2)  # accepted; the replica dies
    await dead_replica.unsubscribe()
    async with start_scheduler(stats_interval=0.2) as scheduler:
        await eventually(lambda: count(scheduler, "duplicate") == 1, timeout=4.0, what="the redelivery settled")
        await until_stream_holds(nc, 0)
        assert runner.received_ids == [req.id] and other.received_ids == []
        assert runner.probes + other.probes == 2  # one probe round, to every engine serving the model
        fresh = await submit(nc, new_request())  # first deliveries are never probed
        await eventually(lambda: fresh.id in runner.received_ids + other.received_ids)
        assert runner.probes + other.probes == 2


async def test_status_endpoint_answers_the_worker_table_and_counters(nc, start_scheduler, engines):
    engine = await engines("e", slots=3)
    async with start_scheduler() as scheduler:
        await known(scheduler, engine)
        await submit(nc, new_request())
        await eventually(lambda: count(scheduler, "dispatched") == 1)
        reply = json.loads((await nc.request(STATUS_SUBJECT, b"", timeout=2)).data)
        assert [w["worker"] for w in reply["workers"]] == [engine.worker]
        assert reply["workers"][0]["slots"] == 3
        assert reply["requests"] == {"normal": {"dispatched": 1}}
        ping_subject = control_subject(ServiceVerb.PING, names.MICRO_SCHEDULER)
        ping = json.loads((await nc.request(ping_subject, b"", timeout=2)).data)
        assert ping["name"] == names.MICRO_SCHEDULER and ping["id"] == reply["instance"]
