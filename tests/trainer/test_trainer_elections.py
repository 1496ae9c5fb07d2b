"""The trainer on a three-node cluster: a job's bus operations ride out a leader election.

Two of the three nodes are killed as soon as a step's event is stored and restarted 8 s later, so the
checkpoint that step uploads next meets streams and buckets that lost their quorum: nothing can be
stored. The upload is retried until the nodes are back and a leader takes it: the job succeeds
with every checkpoint, none skipped. (Killing only the stream's leader is not enough: the other two
at times elect a new one before the trainer has packed the checkpoint.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import msgspec
import nats
import nats.js.errors
import pytest
from prometheus_client import CollectorRegistry

from schemas import names, training
from schemas.training import TrainEvent
from services.trainer.config import TrainerConfig
from services.trainer.metrics import TrainerMetrics
from services.trainer.service import TrainerService
from tests.cluster_support import ELECTION_ERRORS, bare_nats_cluster, nats_cluster  # noqa: F401 (fixtures)
from tests.trainer.test_trainer_service import (chat_jsonl, job_state, make_job, submit,  # noqa: F401
                                                trainer_state, upload, wait_until)

pytestmark = [pytest.mark.slow]

# Two of the three nodes are down this long: no stream or bucket has a quorum, so nothing is stored.
# Longer than an attempt's wait for its ack (5 s), which a shorter loss would only delay.
_QUORUM_LOST_FOR = 8.0


async def test_a_checkpoint_upload_that_meets_the_object_stores_election_is_retried(nats_cluster, trainer_state,
                                                                                   caplog):
    caplog.set_level(logging.WARNING)
    survivor, *others = nats_cluster.nodes
    nc = await nats.connect(survivor.url)  # everyone stays on the node that lives
    js = nc.jetstream()
    events: list[TrainEvent] = []
    killed_after: list[int] = []
    restarts: list[asyncio.Task] = []

    async def on_event(msg) -> None:
        event = msgspec.json.decode(msg.data, type=TrainEvent)
        events.append(event)
        if event.type == "metrics" and event.data.get("step") == 2 and not killed_after:
            killed_after.append(2)
            # Once the event is stored, so the quorum loss meets the checkpoint's upload (which follows the
            # event's acknowledgement), not the event's own publish. The upload comes 0.1 s or more later.
            await _until_stored(js, msg.subject, event.id)
            for node in others:
                node.kill()
            restarts.append(asyncio.create_task(_restart_later(others, _QUORUM_LOST_FOR)))

    await nc.subscribe("llm.v1.train.job.*.event", cb=on_event)
    cfg = TrainerConfig(nats_url="", trainer_id=f"t-{uuid.uuid4().hex[:6]}", state_dir=str(trainer_state),
                        device="cpu", keepalive=2.0)
    stop = asyncio.Event()
    task = asyncio.create_task(TrainerService(nc, cfg, TrainerMetrics(CollectorRegistry())).run(stop))
    try:
        file_id = await upload(js, chat_jsonl())
        job = make_job(file_id, steps=5, save_steps=1)
        await submit(js, job)

        state = await _terminal_state(js, job.id, timeout=300)

        assert killed_after == [2]
        assert state.status == training.SUCCEEDED, state.error
        assert [c.step for c in state.checkpoints] == [3, 4, 5]  # the last three are kept
        await wait_until(lambda: any(e.data.get("status") == training.SUCCEEDED for e in events))
        # A core subscriber sees each attempt of a retried publish; the stream keeps one copy per event id.
        once = {e.id: e for e in events}.values()
        assert [e.data["step"] for e in once if e.type == "checkpoint"] == [1, 2, 3, 4, 5]  # none skipped
        retried = [r.getMessage() for r in caplog.records if "met a leader election" in r.getMessage()]
        assert any(f"job {job.id}: checkpoint 2 upload" in m for m in retried), retried
    finally:
        stop.set()
        await asyncio.wait_for(task, 120)
        await asyncio.gather(*restarts)
        await nc.close()


async def _until_stored(js, subject: str, event_id: str) -> None:
    while True:
        with contextlib.suppress(*ELECTION_ERRORS, nats.js.errors.NotFoundError):
            last = await js.get_last_msg(names.TRAIN_EVENTS_STREAM, subject)
            if msgspec.json.decode(last.data, type=TrainEvent).id == event_id:
                return
        await asyncio.sleep(0.002)


async def _restart_later(nodes, delay: float) -> None:
    await asyncio.sleep(delay)
    for node in nodes:
        await asyncio.to_thread(node.start)


async def _terminal_state(js, job_id: str, timeout: float):
    """The job's state once terminal; the test's own reads, too, may meet the jobs bucket's election."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            state = await job_state(js, job_id)
        except ELECTION_ERRORS:
            state = None
        if state is not None and state.status in training.TERMINAL:
            return state
        assert time.monotonic() < deadline, f"job {job_id} not finished after {timeout}s: {state}"
        await asyncio.sleep(0.2)
