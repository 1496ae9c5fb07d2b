"""The native training API: start (camelCase or snake_case), status, jobs, cancel, live SSE progress."""

from __future__ import annotations

import asyncio
import io
import json

import msgspec
import pytest

from schemas import names
from schemas.training import CANCELLED, FAILED, RUNNING, SUCCEEDED, JobError, TrainingJob
from tests.edge_harness import assert_error
from tests.training_harness import BASE_MODEL, DATASET, edge, trainer, training_config  # noqa: F401 - fixtures


async def _queued(js) -> TrainingJob:
    msg = await js.get_last_msg(names.TRAIN_STREAM, names.TRAIN_SUBMIT)
    return msgspec.json.decode(msg.data, type=TrainingJob)


async def test_start_camel_case_with_a_trainer_path(edge, js):
    resp = await edge.post("/api/v1/training/start", json={
        "jobId": "my-job-1", "baseModel": BASE_MODEL, "datasetPath": "/data/alpaca.json", "datasetFormat": "alpaca",
        "method": "ia3", "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "targetModules": ["k_proj"]},
        "hyperparameters": {"epochs": 2, "perDeviceBatchSize": 8, "gradientAccumulationSteps": 2,
                            "learningRate": 5e-5, "warmupRatio": 0.1, "maxSeqLength": 2048, "saveSteps": 10,
                            "loggingSteps": 5},
        "metadata": {"keepThisKey": "v"}})
    assert resp.status == 200, await resp.text()
    status = await resp.json()
    assert status["jobId"] == "my-job-1" and status["status"] == "queued" and status["method"] == "ia3"
    job = await _queued(js)
    assert job.id == "my-job-1" and job.training_file == "/data/alpaca.json" and job.dataset_format == "alpaca"
    assert (job.peft.method, job.peft.r, job.peft.alpha, job.peft.target_modules) == ("ia3", 4, 8, ["k_proj"])
    hp = job.hyperparameters
    assert (hp.n_epochs, hp.batch_size, hp.gradient_accumulation_steps, hp.learning_rate, hp.warmup_ratio,
            hp.max_seq_length, hp.save_steps, hp.logging_steps) == (2, 8, 2, 5e-5, 0.1, 2048, 10, 5)
    assert job.metadata == {"keepThisKey": "v"}

    again = await edge.post("/api/v1/training/start", json={"jobId": "my-job-1", "baseModel": BASE_MODEL,
                                                            "datasetPath": "/data/other.json"})
    assert again.status == 409
    assert_error(await again.json(), "conflict", "jobId")


async def test_start_snake_case_with_an_uploaded_file(edge, js):
    upload = await (await edge.post("/v1/files", data={"purpose": "fine-tune", "file": io.BytesIO(DATASET)})).json()
    resp = await edge.post("/api/v1/training/start", json={
        "base_model": BASE_MODEL, "file_id": upload["id"], "hyperparameters": {"per_device_batch_size": 2}})
    assert resp.status == 200, await resp.text()
    job = await _queued(js)
    assert job.training_file == upload["id"] and job.hyperparameters.batch_size == 2 and job.peft.method == "lora"


@pytest.mark.parametrize(("body", "status", "code", "param"), [
    ({"baseModel": BASE_MODEL}, 400, "invalid_request", "datasetPath"),
    ({"baseModel": BASE_MODEL, "fileId": "file-missing"}, 400, "invalid_request", "fileId"),
    ({"baseModel": "nope/model", "datasetPath": "/d.jsonl"}, 404, "model_not_found", "baseModel"),
    ({"baseModel": BASE_MODEL, "datasetPath": "/d.jsonl", "method": "telepathy"}, 400, "invalid_request", "method"),
    ({"baseModel": BASE_MODEL, "datasetPath": "/d.jsonl", "hyperparameters": {"epochs": "two"}}, 400,
     "invalid_request", "hyperparameters.epochs"),
    ({"baseModel": BASE_MODEL, "base_model": BASE_MODEL, "datasetPath": "/d.jsonl"}, 400, "invalid_request",
     "base_model"),
    ({"baseModel": BASE_MODEL, "datasetPath": "/d.jsonl", "jobId": "has a space"}, 400, "invalid_request", "jobId"),
])
async def test_bad_native_start_bodies(edge, js, body, status, code, param):
    resp = await edge.post("/api/v1/training/start", json=body)
    assert resp.status == status
    assert_error(await resp.json(), code, param)
    assert (await js.stream_info(names.TRAIN_STREAM)).state.messages == 0


async def test_status_jobs_and_cancel(edge, trainer):
    started = await (await edge.post("/api/v1/training/start", json={
        "baseModel": BASE_MODEL, "datasetPath": "/d.jsonl"})).json()
    job_id = started["jobId"]
    await trainer.take()
    await trainer.status(job_id, RUNNING)
    await trainer.step(job_id, 3, 12, loss=1.25)
    status = await (await edge.get(f"/api/v1/training/status/{job_id}")).json()
    assert status["status"] == RUNNING and (status["step"], status["totalSteps"]) == (3, 12)
    assert status["percent"] == 25.0 and status["loss"] == 1.25 and status["etaSeconds"] == 9.0
    assert status["memoryBytes"] == 1 << 30 and status["estimatedFinish"] is not None

    other = await (await edge.post("/api/v1/training/start", json={
        "baseModel": BASE_MODEL, "datasetPath": "/e.jsonl"})).json()
    jobs = (await (await edge.get("/api/v1/training/jobs")).json())["jobs"]
    assert [j["jobId"] for j in jobs] == [other["jobId"], job_id]
    running = (await (await edge.get("/api/v1/training/jobs?status=running")).json())["jobs"]
    assert [j["jobId"] for j in running] == [job_id]

    cancelled = await edge.post(f"/api/v1/training/{job_id}/cancel")
    assert (await cancelled.json())["status"] == CANCELLED
    assert (await edge.post(f"/api/v1/training/{job_id}/cancel")).status == 409
    missing = await edge.get("/api/v1/training/status/ftjob-missing")
    assert missing.status == 404
    assert_error(await missing.json(), "not_found")


async def _read_sse(resp, keep_alive: asyncio.Event | None = None) -> list[str]:
    """Every SSE block (``data: ...`` or a ``:`` comment) until the stream closes; ``keep_alive`` is set at
    the first keep-alive comment."""
    blocks = []
    buffer = b""
    async for chunk in resp.content.iter_any():
        buffer += chunk
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            blocks.append(block.decode())
            if keep_alive is not None and block.startswith(b":"):
                keep_alive.set()
    return blocks


async def test_stream_replays_then_follows_live_until_the_job_ends(edge, trainer):
    started = await (await edge.post("/api/v1/training/start", json={
        "baseModel": BASE_MODEL, "datasetPath": "/d.jsonl"})).json()
    job_id = started["jobId"]
    await trainer.take()
    await trainer.status(job_id, RUNNING)
    await trainer.step(job_id, 1, 3, loss=3.0)  # before the client connects: replayed

    resp = await edge.get(f"/api/v1/training/{job_id}/stream")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    kept_alive = asyncio.Event()
    reading = asyncio.create_task(_read_sse(resp, kept_alive))
    await asyncio.wait_for(kept_alive.wait(), 10)  # idle: the edge keeps the stream open with a comment
    assert not reading.done()
    await trainer.step(job_id, 2, 3, loss=2.0)
    await trainer.step(job_id, 3, 3, loss=1.0)
    await trainer.status(job_id, SUCCEEDED, fine_tuned_model=f"{BASE_MODEL}:ft-x")
    blocks = await asyncio.wait_for(reading, 10)

    assert ": keep-alive" in blocks
    events = [json.loads(b[len("data: "):]) for b in blocks if b.startswith("data: ")]
    assert [e.get("data", {}).get("step") for e in events if e.get("type") == "metrics"] == [1, 2, 3]
    assert events[0]["data"]["status"] == RUNNING
    assert events[-2]["data"]["status"] == SUCCEEDED
    final = events[-1]
    assert final["done"] is True and final["status"] == SUCCEEDED and final["fineTunedModel"] == f"{BASE_MODEL}:ft-x"


async def test_stream_of_a_finished_job_replays_and_ends(edge, trainer):
    job_id = (await (await edge.post("/api/v1/training/start", json={
        "baseModel": BASE_MODEL, "datasetPath": "/d.jsonl"})).json())["jobId"]
    await trainer.status(job_id, FAILED, error=JobError(code="invalid_file", message="line 3 is not JSON"))
    blocks = await asyncio.wait_for(_read_sse(await edge.get(f"/api/v1/training/{job_id}/stream")), 10)
    final = json.loads(blocks[-1][len("data: "):])
    assert final["done"] and final["status"] == FAILED and final["error"]["message"] == "line 3 is not JSON"


async def test_stream_ends_when_the_state_ends_without_a_final_event(edge, trainer, js):
    job_id = (await (await edge.post("/api/v1/training/start", json={
        "baseModel": BASE_MODEL, "datasetPath": "/d.jsonl"})).json())["jobId"]
    state, _ = await trainer.state(job_id)
    state.status = FAILED  # a producer that only wrote the state
    await trainer.write(state)
    blocks = await asyncio.wait_for(_read_sse(await edge.get(f"/api/v1/training/{job_id}/stream")), 10)
    assert json.loads(blocks[-1][len("data: "):])["status"] == FAILED


async def test_stream_of_an_unknown_job_is_a_404(edge):
    resp = await edge.get("/api/v1/training/ftjob-unknown/stream")
    assert resp.status == 404
    assert_error(await resp.json(), "not_found")
