"""A NATS-native producer whose engine dies gets a typed ``worker_lost`` error, never a hang.

The edge follows its own requests' engines (and migrates them), so requests it publishes carry
``producer_watches`` and get no such error from the scheduler. Three layers: the pure table of
running requests, the scheduler on the bus with engine doubles that fall silent, and real
processes (simulated engine SIGKILLed mid-stream, a raw NATS producer).
"""

from __future__ import annotations

import time

import nats
import pytest

from schemas import names
from schemas.errors import ErrorCode
from schemas.events import StreamError, StreamStart, TokenDelta, decode_event, encode
from schemas.heartbeat import EngineHeartbeat
from schemas.inference import CancelRequest, InferenceRequest
from services.common.worker_table import WorkerTable
from services.scheduler.running import NO_DEADLINE_HORIZON, RunningRequests
from tests.e2e.test_e2e_failover import MODEL, PROMPT, SimCluster
from tests.scheduler.test_scheduler_harness import (INTERVAL, ReplyInbox, engines, eventually, known,  # noqa: F401
                                                    new_request, start_scheduler, submit)

LONG = 120.0  # the producers' deadline: every wait in these tests is far shorter


# --- the pure table ---

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def heartbeat(worker: str, seq: int = 1) -> EngineHeartbeat:
    return EngineHeartbeat(worker=worker, engine="double", device="cpu", models=[], slots=1, in_flight=0,
                           seq=seq, ts=0.0, interval=1.0, started=1.0)


def request(rid: str, deadline: float = 0.0) -> InferenceRequest:
    return InferenceRequest(id=rid, model="m", reply_to=f"_INBOX.p.{rid}", prompt="hi", deadline=deadline)


def tracked(clock: Clock, table: WorkerTable, limit: int = 100) -> RunningRequests:
    running = RunningRequests(limit=limit, clock=clock)
    table.observe(heartbeat("w1"))
    table.observe(heartbeat("w2"))
    return running


def test_only_the_dead_engines_requests_are_handed_back_once():
    clock, mono = Clock(), Clock()
    table = WorkerTable(clock=mono)
    running = tracked(clock, table)
    running.add(request("a", deadline=clock.now + LONG), "w1", 3, table.get("w1"))
    running.add(request("b", deadline=clock.now + LONG), "w2", 0, table.get("w2"))
    assert running.lost(table) == []
    mono.now += 2.0
    table.observe(heartbeat("w2", seq=2))  # w2 keeps heart-beating, w1 falls silent
    assert running.lost(table) == []  # two intervals: not dead yet
    mono.now += 1.5
    table.observe(heartbeat("w2", seq=3))
    [lost] = running.lost(table)
    assert (lost.request_id, lost.worker, lost.reply_to, lost.dispatch) == ("a", "w1", "_INBOX.p.a", 3)
    assert running.lost(table) == [] and "a" not in running and "b" in running


def test_an_engine_dropped_from_the_table_is_judged_by_its_last_heartbeat():
    # The scheduler forgets an engine after a failed dispatch; one that still heart-beats comes back,
    # one that does not is dead three intervals after its last heartbeat.
    clock, mono = Clock(), Clock()
    table = WorkerTable(clock=mono)
    running = tracked(clock, table)
    running.add(request("a", deadline=clock.now + LONG), "w1", 0, table.get("w1"))
    table.remove("w1")
    assert running.lost(table) == []  # its last heartbeat is fresh
    mono.now += 3.5
    assert [r.request_id for r in running.lost(table)] == ["a"]


def test_entries_leave_at_their_deadline_on_cancel_and_beyond_the_limit():
    clock, mono = Clock(), Clock()
    table = WorkerTable(clock=mono)
    running = tracked(clock, table, limit=3)
    running.add(request("soon", deadline=clock.now + 5), "w1", 0, None)
    running.add(request("late", deadline=clock.now + 50), "w1", 0, None)
    running.add(request("none"), "w1", 0, None)  # no deadline: kept for NO_DEADLINE_HORIZON
    running.add(request("past", deadline=clock.now - 1), "w1", 0, None)  # already over: never kept
    assert len(running) == 3 and "past" not in running
    running.add(request("later", deadline=clock.now + 60), "w2", 0, None)  # over the limit: the first due goes
    assert "soon" not in running and len(running) == 3
    running.discard("later")  # cancelled by its producer
    clock.now += 51
    assert running.lost(table) == [] and "late" not in running and "none" in running
    clock.now += NO_DEADLINE_HORIZON
    running.lost(table)
    assert len(running) == 0


# --- the scheduler on the bus, engines played by doubles ---

def lost_count(scheduler) -> float:
    return scheduler.metrics.registry.get_sample_value("llm_scheduler_worker_lost_requests_total") or 0.0


async def test_a_nats_producer_gets_worker_lost_with_the_dispatch_number_when_its_engine_falls_silent(
        nc, start_scheduler, engines):
    liar = await engines("liar", slots=8)  # offered first (emptier), answers busy: the next offer is number 1
    liar.busy = True
    doomed = await engines("doomed", slots=2)
    async with start_scheduler() as scheduler, ReplyInbox(nc) as inbox:
        await known(scheduler, liar, doomed)
        req = await submit(nc, new_request(reply_to=inbox.subject, deadline=time.time() + LONG))
        await eventually(lambda: doomed.received_ids == [req.id], what="the accept by the doomed engine")
        await liar.stop_heartbeats()  # both silent now; only doomed runs the request
        await doomed.stop_heartbeats()
        error = await inbox.error(timeout=10)
        assert (error.id, error.code, error.dispatch) == (req.id, ErrorCode.WORKER_LOST, 1)
        assert doomed.received[0].dispatch == 1
        assert error.message == f"engine {doomed.worker} stopped heart-beating while running this request"
        assert len(inbox.events) == 1  # told once
        assert lost_count(scheduler) == 1


async def test_edge_requests_and_cancelled_ones_get_no_worker_lost_from_the_scheduler(nc, start_scheduler, engines):
    first = await engines("first", slots=3)
    async with start_scheduler() as scheduler, ReplyInbox(nc) as edge, ReplyInbox(nc) as cancelled, \
            ReplyInbox(nc) as producer, ReplyInbox(nc) as sentinel:
        await known(scheduler, first)
        deadline = time.time() + LONG
        reqs = [await submit(nc, new_request(reply_to=edge.subject, deadline=deadline, producer_watches=True)),
                await submit(nc, new_request(reply_to=cancelled.subject, deadline=deadline)),
                await submit(nc, new_request(reply_to=producer.subject, deadline=deadline))]
        await eventually(lambda: first.received_ids == [r.id for r in reqs], what="three accepts")
        await nc.publish(names.INFER_CANCEL, encode(CancelRequest(id=reqs[1].id, reason="client_disconnected")))
        await eventually(lambda: reqs[1].id in scheduler.memory.cancelled, what="the cancel")
        await first.stop_heartbeats()
        assert (await producer.error(timeout=10)).code == ErrorCode.WORKER_LOST
        # A later loss on the same scheduler connection: any error sent to the other two inboxes on the
        # first loss would have arrived before this one.
        second = await engines("second", slots=1)
        await known(scheduler, second)
        late = await submit(nc, new_request(reply_to=sentinel.subject, deadline=deadline))
        await eventually(lambda: second.received_ids == [late.id], what="the sentinel's accept")
        await second.stop_heartbeats()
        assert (await sentinel.error(timeout=10)).id == late.id
        assert edge.events == [] and cancelled.events == []
        assert lost_count(scheduler) == 2


# --- real processes: a simulated engine SIGKILLed mid-stream ---

@pytest.mark.e2e
@pytest.mark.slow
async def test_a_raw_nats_producer_whose_engine_is_sigkilled_mid_stream_gets_worker_lost(tmp_path):
    cluster = SimCluster(tmp_path)
    try:
        await cluster.start({"eng-doomed": 2}, token_rate=5)
        nc = await nats.connect(cluster.server.url)
        try:
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            request = InferenceRequest(id="raw-producer-1", model=MODEL, reply_to=inbox, prompt=PROMPT,
                                       deadline=time.time() + LONG)
            request.sampling.max_tokens = 500  # 100 s at 5 tokens/s: only the kill can end it early
            await nc.jetstream().publish(names.infer_submit("normal"), encode(request))
            start = decode_event((await sub.next_msg(timeout=30)).data)
            assert isinstance(start, StreamStart) and start.worker == "eng-doomed"
            assert isinstance(decode_event((await sub.next_msg(timeout=30)).data), TokenDelta)
            cluster.kill("eng-doomed")
            event = decode_event((await sub.next_msg(timeout=30)).data)
            while isinstance(event, TokenDelta):  # deltas already on the wire before the kill
                event = decode_event((await sub.next_msg(timeout=30)).data)
            assert isinstance(event, StreamError), event
            assert (event.id, event.code, event.dispatch) == (request.id, ErrorCode.WORKER_LOST, start.dispatch)
            assert "eng-doomed" in event.message
        finally:
            await nc.close()
    finally:
        await cluster.stop()


async def test_a_scheduler_held_up_past_three_intervals_keeps_the_engines_that_kept_beating(start_scheduler, engines,
                                                                                             caplog):
    # The scheduler's event loop held up (a long collector pause on a loaded host): the heartbeats
    # of that time wait unread, so the first expiry pass after it is skipped, not judged on them.
    async with start_scheduler() as scheduler:
        alive, silent = await engines("alive"), await engines("silent")
        await known(scheduler, alive, silent)
        await silent.stop_heartbeats()
        time.sleep(4 * INTERVAL)  # past three of every engine's intervals
        await eventually(lambda: f"engine {silent.worker} missed" in caplog.text, what="the silent engine dropped")
        assert f"engine {alive.worker} missed" not in caplog.text
        assert scheduler.table.get(alive.worker) is not None
