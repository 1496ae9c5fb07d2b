"""``/v1/fine_tuning/jobs`` with the official OpenAI SDK: jobs land on the bus as the protocol says."""

from __future__ import annotations

import asyncio
import io

import msgspec
import openai
import pytest

from schemas import names
from schemas.training import CANCELLED, QUEUED, RUNNING, SUCCEEDED, JobState, TrainCancel, TrainingJob
from services.common import bus
from tests.edge_harness import assert_error
from tests.training_harness import BASE_MODEL, DATASET, edge, sdk, trainer, training_config  # noqa: F401 - fixtures


async def _upload(sdk) -> str:
    return (await sdk.files.create(file=("train.jsonl", io.BytesIO(DATASET)), purpose="fine-tune")).id


async def _create(sdk, file_id: str, **extra):
    return await sdk.fine_tuning.jobs.create(model=BASE_MODEL, training_file=file_id, **extra)


async def test_sdk_create_queues_the_job_on_the_bus_with_its_id_as_msg_id(sdk, js):
    file_id = await _upload(sdk)
    job = await sdk.fine_tuning.jobs.create(
        model=BASE_MODEL, training_file=file_id, suffix="support-bot", seed=7, metadata={"team": "a"},
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 0.5}}},
        extra_body={"peft": {"method": "dora", "r": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"]},
                    "extra_hyperparameters": {"gradient_accumulation_steps": 4, "max_seq_length": 1024},
                    "dataset_format": "openai"})
    assert job.id.startswith("ftjob-") and job.object == "fine_tuning.job" and job.status == QUEUED
    assert job.model == BASE_MODEL and job.training_file == file_id and job.seed == 7
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 4
    assert job.hyperparameters.learning_rate_multiplier == pytest.approx(0.5)
    assert job.method.type == "supervised" and job.method.supervised.hyperparameters.n_epochs == 2
    extra = job.model_extra
    assert extra["peft"]["method"] == "dora" and extra["peft"]["r"] == 16
    assert extra["extra_hyperparameters"]["gradient_accumulation_steps"] == 4
    assert extra["user_provided_suffix"] == "support-bot" and extra["progress"]["step"] == 0

    msg = await js.get_last_msg(names.TRAIN_STREAM, names.TRAIN_SUBMIT)
    assert msg.headers["Nats-Msg-Id"] == job.id
    queued = msgspec.json.decode(msg.data, type=TrainingJob)
    assert queued.id == job.id and queued.peft.method == "dora" and queued.peft.target_modules == ["q_proj", "v_proj"]
    assert queued.hyperparameters.learning_rate == pytest.approx(1e-4)
    assert queued.hyperparameters.gradient_accumulation_steps == 4 and queued.dataset_format == "openai"
    assert queued.metadata == {"team": "a"} and queued.suffix == "support-bot"

    kv = await js.key_value(names.TRAIN_JOBS_BUCKET)
    state = msgspec.json.decode((await kv.get(job.id)).value, type=JobState)
    assert state.status == QUEUED and state.job == queued

    # A producer retrying the same job (same Nats-Msg-Id) is deduplicated by JetStream.
    ack = await js.publish(names.TRAIN_SUBMIT, msg.data, headers={"Nats-Msg-Id": job.id})
    assert ack.duplicate
    assert (await js.stream_info(names.TRAIN_STREAM)).state.messages == 1


async def test_an_engine_served_model_is_accepted_by_alias_under_its_canonical_id(sdk, nc, js):
    from tests.edge_harness import ALIAS, MODEL, BusEngine
    engine = await BusEngine(nc, js).start()
    try:
        file_id = await _upload(sdk)
        for _ in range(100):  # the worker table fills from heartbeats
            try:
                job = await sdk.fine_tuning.jobs.create(model=ALIAS, training_file=file_id)
                break
            except openai.NotFoundError:
                await asyncio.sleep(0.05)
        assert job.model == MODEL
    finally:
        await engine.stop_heartbeats()


async def test_list_retrieve_and_cancel_a_queued_job(sdk, nc, js):
    file_id = await _upload(sdk)
    jobs = [await _create(sdk, file_id) for _ in range(3)]
    listed = await sdk.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in listed.data] == [jobs[2].id, jobs[1].id] and listed.has_more
    assert [j.id async for j in sdk.fine_tuning.jobs.list(limit=2)] == [j.id for j in reversed(jobs)]
    assert (await sdk.fine_tuning.jobs.retrieve(jobs[0].id)).id == jobs[0].id
    tagged = await _create(sdk, file_id, metadata={"team": "search"})
    assert [j.id for j in (await sdk.fine_tuning.jobs.list(metadata={"team": "search"})).data] == [tagged.id]

    cancels: list[TrainCancel] = []
    got = asyncio.Event()

    async def on_cancel(msg):
        cancels.append(msgspec.json.decode(msg.data, type=TrainCancel))
        got.set()

    await nc.subscribe(names.TRAIN_CANCEL, cb=on_cancel)
    await bus.flush(nc)
    cancelled = await sdk.fine_tuning.jobs.cancel(jobs[0].id)
    assert cancelled.status == CANCELLED and cancelled.finished_at is not None
    await asyncio.wait_for(got.wait(), 5)
    assert cancels[0].id == jobs[0].id
    kv = await js.key_value(names.TRAIN_JOBS_BUCKET)
    assert msgspec.json.decode((await kv.get(jobs[0].id)).value, type=JobState).status == CANCELLED
    events = await sdk.fine_tuning.jobs.list_events(jobs[0].id)
    assert events.data[0].data["status"] == CANCELLED

    with pytest.raises(openai.ConflictError) as info:  # already cancelled: nothing to cancel
        await sdk.fine_tuning.jobs.cancel(jobs[0].id)
    assert info.value.body["code"] == "conflict"


async def test_events_and_checkpoints_the_trainer_records(sdk, trainer):
    job = await _create(sdk, await _upload(sdk))
    taken = await trainer.take()
    assert taken.id == job.id
    await trainer.status(job.id, RUNNING, trainer="t1")
    for step in range(1, 5):
        await trainer.step(job.id, step, 4, loss=2.0 / step)
        if step % 2 == 0:
            await trainer.checkpoint(job.id, step, loss=2.0 / step)
    running = await sdk.fine_tuning.jobs.retrieve(job.id)
    assert running.status == RUNNING and running.model_extra["progress"]["step"] == 4
    await trainer.status(job.id, SUCCEEDED, fine_tuned_model=f"{BASE_MODEL}:ft-1", trained_tokens=1234,
                         finished_at=1_700_000_000)

    done = await sdk.fine_tuning.jobs.retrieve(job.id)
    assert done.status == SUCCEEDED and done.fine_tuned_model == f"{BASE_MODEL}:ft-1" and done.trained_tokens == 1234
    events = await sdk.fine_tuning.jobs.list_events(job.id, limit=100)
    assert len(events.data) == 1 + 4 + 2 + 1 and not events.has_more
    assert events.data[0].data["status"] == SUCCEEDED  # newest first
    assert events.data[-1].data["status"] == RUNNING
    metrics = [e for e in events.data if e.type == "metrics"]
    assert [e.data["step"] for e in metrics] == [4, 3, 2, 1]
    page = await sdk.fine_tuning.jobs.list_events(job.id, limit=3, after=events.data[2].id)
    assert [e.id for e in page.data] == [e.id for e in events.data[3:6]]

    checkpoints = await sdk.fine_tuning.jobs.checkpoints.list(job.id)
    assert [c.step_number for c in checkpoints.data] == [4, 2]
    first = checkpoints.data[0]
    assert first.fine_tuning_job_id == job.id and first.metrics.train_loss == pytest.approx(0.5)
    assert first.fine_tuned_model_checkpoint == f"{BASE_MODEL}:ft-1:ftckpt-4"
    with pytest.raises(openai.ConflictError):
        await sdk.fine_tuning.jobs.cancel(job.id)


@pytest.mark.parametrize(("body", "status", "code", "param"), [
    ({"training_file": "file-missing"}, 400, "invalid_request", "training_file"),
    ({"training_file": "not-a-file-id"}, 400, "invalid_request", "training_file"),
    ({"model": "no/such-model"}, 404, "model_not_found", "model"),
    ({"peft": {"method": "magic"}}, 400, "invalid_request", "peft.method"),
    ({"suffix": "Has Spaces"}, 400, "invalid_request", "suffix"),
    ({"suffix": "x" * 65}, 400, "invalid_request", "suffix"),
    ({"method": {"type": "dpo", "dpo": {}}}, 400, "unsupported", "method.type"),
    ({"hyperparameters": {"n_epochs": "many"}}, 400, "invalid_request", "hyperparameters.n_epochs"),
    ({"hyperparameters": {"n_epochs": 0}}, 400, "invalid_request", "hyperparameters.n_epochs"),
    ({"hyperparameters": {"learning_rate_multiplier": -1}}, 400, "invalid_request",
     "hyperparameters.learning_rate_multiplier"),
    ({"seed": "seven"}, 400, "invalid_request", "seed"),
    ({"peft": {"dropout": 1.5}}, 400, "invalid_request", "peft.dropout"),
    ({"dataset_format": "xml"}, 400, "invalid_request", "dataset_format"),
    ({"extra_hyperparameters": {"warmup_ratio": 2}}, 400, "invalid_request", "extra_hyperparameters.warmup_ratio"),
])
async def test_bad_job_requests_are_openai_errors_and_queue_nothing(edge, js, body, status, code, param):
    upload = await edge.post("/v1/files", data={"purpose": "fine-tune", "file": io.BytesIO(DATASET)})
    full = {"model": BASE_MODEL, "training_file": (await upload.json())["id"], **body}
    resp = await edge.post("/v1/fine_tuning/jobs", json=full)
    assert resp.status == status
    assert_error(await resp.json(), code, param)
    assert (await js.stream_info(names.TRAIN_STREAM)).state.messages == 0


async def test_unknown_job_is_a_404_everywhere(edge):
    for method, path in (("GET", "/v1/fine_tuning/jobs/ftjob-nope"), ("POST", "/v1/fine_tuning/jobs/ftjob-nope/cancel"),
                         ("GET", "/v1/fine_tuning/jobs/ftjob-nope/events"),
                         ("GET", "/v1/fine_tuning/jobs/ftjob-nope/checkpoints")):
        resp = await edge.request(method, path)
        assert resp.status == 404, path
        assert_error(await resp.json(), "not_found")
    resp = await edge.get("/v1/fine_tuning/jobs?limit=0")
    assert resp.status == 400
    assert_error(await resp.json(), "invalid_request", "limit")
    resp = await edge.post("/v1/fine_tuning/jobs", data=b"{not json", headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert_error(await resp.json(), "invalid_request")


async def test_an_unprovisioned_server_is_a_503_that_says_what_to_run(nats_server, training_config):
    from aiohttp.test_utils import TestClient, TestServer

    from services.edge import create_app

    async with TestClient(TestServer(create_app(training_config))) as client:
        for method, path in (("GET", "/v1/fine_tuning/jobs"), ("GET", "/v1/files")):
            resp = await client.request(method, path)
            assert resp.status == 503, path
            body = await resp.json()
            assert_error(body, "unavailable")
            assert "./cy infra apply" in body["error"]["message"]
