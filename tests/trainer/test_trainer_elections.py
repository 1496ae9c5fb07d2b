"""The trainer on a three-node cluster: a job's bus operations ride out a leader election.

The node leading the object store's stream is killed the moment a step's event arrives, so the
checkpoint that step uploads next meets a stream with no leader. The upload is retried until the
new leader takes it: the job succeeds with every checkpoint, none skipped.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import msgspec
import nats
import pytest
from prometheus_client import CollectorRegistry

from schemas import names, training
from schemas.training import TrainEvent
from services.trainer.config import TrainerConfig
from services.trainer.metrics import TrainerMetrics
from services.trainer.service import TrainerService
from tests.cluster_support import bare_nats_cluster, nats_cluster, stream_leader  # noqa: F401 (fixtures)
from tests.trainer.test_trainer_service import (chat_jsonl, make_job, submit, trainer_state,  # noqa: F401
                                                upload, wait_status, wait_until)

pytestmark = [pytest.mark.slow]


async def test_a_checkpoint_upload_that_meets_the_object_stores_election_is_retried(nats_cluster, trainer_state,
                                                                                   caplog):
    caplog.set_level(logging.WARNING)
    probe = await nats.connect(nats_cluster.urls)
    leader = await stream_leader(probe.jetstream(), f"OBJ_{names.ARTIFACTS_STORE}")
    await probe.close()
    # Everyone stays connected to the nodes that live.
    nc = await nats.connect([u for u, n in zip(nats_cluster.urls, nats_cluster.server_names) if n != leader],
                            dont_randomize=True)
    js = nc.jetstream()
    events: list[TrainEvent] = []
    killed_after: list[int] = []

    async def on_event(msg) -> None:
        event = msgspec.json.decode(msg.data, type=TrainEvent)
        events.append(event)
        if event.type == "metrics" and event.data.get("step") == 2 and not killed_after:
            nats_cluster.node_named(leader).kill()  # before the trainer starts uploading step 2's checkpoint
            killed_after.append(2)

    await nc.subscribe("llm.v1.train.job.*.event", cb=on_event)
    cfg = TrainerConfig(nats_url="", trainer_id=f"t-{uuid.uuid4().hex[:6]}", state_dir=str(trainer_state),
                        device="cpu", keepalive=2.0)
    stop = asyncio.Event()
    task = asyncio.create_task(TrainerService(nc, cfg, TrainerMetrics(CollectorRegistry())).run(stop))
    try:
        file_id = await upload(js, chat_jsonl())
        job = make_job(file_id, steps=5, save_steps=1)
        await submit(js, job)

        state = await wait_status(js, job.id, training.TERMINAL, timeout=300)

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
        await nc.close()
