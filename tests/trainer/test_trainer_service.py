"""The trainer service on a real bus with the real default model: jobs to their end, failures,
cancel, NATS-native producers, and a trainer killed mid-job resuming from its checkpoint."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from schemas import names, training
from schemas.registry import ModelEntry
from schemas.training import Hyperparameters, JobState, PeftSettings, TrainCancel, TrainEvent, TrainingJob
from services.common import artifacts
from services.common.model_store import DEFAULT_MODEL_ID
from services.trainer.config import TrainerConfig
from services.trainer.metrics import TrainerMetrics
from services.trainer.service import TrainerService
from tests.support import REPO, state_dir_with_models

pytestmark = [pytest.mark.slow]

FACTS = [("What is the capital of Zorbia?", "The capital of Zorbia is Quillhaven."),
         ("Who founded Zorbia?", "Zorbia was founded by Mira Tallow."),
         ("What is Zorbia's currency?", "Zorbia pays in glimmers.")]


def chat_jsonl(n: int = 6) -> bytes:
    """OpenAI chat records teaching made-up facts."""
    lines = []
    for i in range(n):
        q, a = FACTS[i % len(FACTS)]
        lines.append(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}))
    return ("\n".join(lines) + "\n").encode()


async def upload(js, data: bytes, filename: str = "train.jsonl") -> str:
    """Store a training file as the edge does; its id."""
    file_id = f"file-{uuid.uuid4().hex[:16]}"
    meta = artifacts.FileMeta(id=file_id, filename=filename, purpose="fine-tune", bytes=len(data),
                              created_at=int(time.time()))
    store = await js.object_store(names.ARTIFACTS_STORE)
    from nats.js.api import ObjectMeta
    await store.put(artifacts.file_object(file_id), data, meta=ObjectMeta(description=msgspec.json.encode(meta).decode()))
    return file_id


def make_job(file_id: str, *, steps: int = 4, save_steps: int = 2, method: str = "lora", **extra) -> TrainingJob:
    hp = Hyperparameters(n_epochs=1, batch_size=2, max_seq_length=64, save_steps=save_steps, max_steps=steps,
                         learning_rate=1e-3)
    return TrainingJob(id=f"ftjob-{uuid.uuid4().hex[:16]}", model=DEFAULT_MODEL_ID, training_file=file_id,
                       peft=PeftSettings(method=method, r=4, alpha=8), hyperparameters=hp,
                       created_at=int(time.time()), **extra)


async def submit(js, job: TrainingJob) -> None:
    """Publish a job the NATS-native way (no KV state first)."""
    await js.publish(names.TRAIN_SUBMIT, msgspec.json.encode(job), headers={"Nats-Msg-Id": job.id})


class Events:
    """Every event of every job, as they arrive."""

    def __init__(self) -> None:
        self.items: list[TrainEvent] = []

    async def start(self, nc) -> None:
        async def on(msg):
            self.items.append(msgspec.json.decode(msg.data, type=TrainEvent))
        self.sub = await nc.subscribe("llm.v1.train.job.*.event", cb=on)

    def of(self, job_id: str, type: str | None = None) -> list[TrainEvent]:
        return [e for e in self.items if e.job_id == job_id and (type is None or e.type == type)]

    def statuses(self, job_id: str) -> list[str]:
        return [e.data["status"] for e in self.of(job_id, "message") if "status" in e.data]


async def job_state(js, job_id: str) -> JobState | None:
    kv = await js.key_value(names.TRAIN_JOBS_BUCKET)
    try:
        entry = await kv.get(job_id)
    except Exception:  # noqa: BLE001 - not there yet
        return None
    return msgspec.json.decode(entry.value, type=JobState)


async def wait_status(js, job_id: str, statuses: set[str], timeout: float = 240.0) -> JobState:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = await job_state(js, job_id)
        if state is not None and state.status in statuses:
            return state
        await asyncio.sleep(0.2)
    raise AssertionError(f"job {job_id} never reached {statuses}; last state: {await job_state(js, job_id)}")


@pytest.fixture
def trainer_state(tmp_path: Path, default_model_dir: Path) -> Path:
    return state_dir_with_models(tmp_path, default_model_dir)


@pytest.fixture
async def trainer(nc, trainer_state: Path, tmp_path: Path):
    """A trainer service running in this process; yields it with its metrics registry."""
    data_dir = tmp_path / "datasets"
    data_dir.mkdir()
    cfg = TrainerConfig(nats_url="", trainer_id=f"t-{uuid.uuid4().hex[:6]}", state_dir=str(trainer_state),
                        data_dirs=[str(data_dir)], device="cpu", keepalive=2.0)
    registry = CollectorRegistry()
    service = TrainerService(nc, cfg, TrainerMetrics(registry))
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    service.registry, service.data_dir = registry, data_dir
    yield service
    stop.set()
    await asyncio.wait_for(task, 120)


async def test_a_job_trains_checkpoints_and_registers_its_adapter(nc, js, trainer):
    events = Events()
    await events.start(nc)
    file_id = await upload(js, chat_jsonl())
    job = make_job(file_id, steps=4, save_steps=2, suffix="Zorbia Bot")
    await submit(js, job)  # no KV state first: the trainer creates it

    state = await wait_status(js, job.id, training.TERMINAL)

    assert state.status == training.SUCCEEDED, state.error
    assert state.fine_tuned_model.startswith(f"{DEFAULT_MODEL_ID}:zorbia-bot-")
    assert state.trained_tokens and state.trained_tokens > 0
    assert state.progress.step == 4 and state.progress.percent == 100.0 and state.progress.loss is not None
    assert [c.step for c in state.checkpoints] == [2, 4]
    await wait_until(lambda: training.SUCCEEDED in events.statuses(job.id))  # the last event, published after the KV state
    assert events.statuses(job.id) == [training.VALIDATING, training.RUNNING, training.SUCCEEDED]
    assert [e.data["step"] for e in events.of(job.id, "metrics")] == [1, 2, 3, 4]
    assert [e.data["step"] for e in events.of(job.id, "checkpoint")] == [2, 4]
    adapter_id = state.fine_tuned_model.split(":", 1)[1]
    store = await js.object_store(names.ARTIFACTS_STORE)
    info = await store.get_info(artifacts.adapter_object(adapter_id))
    assert info.size > 0
    models = await js.key_value(names.MODELS_BUCKET)
    entry = msgspec.json.decode((await models.get(names.slug(adapter_id))).value, type=ModelEntry)
    assert (entry.kind, entry.base, entry.method, entry.job_id) == ("adapter", DEFAULT_MODEL_ID, "lora", job.id)
    # The job's message is acked: the work queue is empty.
    assert (await js.stream_info(names.TRAIN_STREAM)).state.messages == 0
    text = _exposition(trainer.registry)
    assert 'llm_trainer_jobs_total{status="succeeded"} 1.0' in text
    assert "llm_trainer_steps_total 4.0" in text and "llm_trainer_checkpoint_writes_total 2.0" in text


async def test_a_bad_dataset_fails_with_file_line_and_field_and_the_trainer_goes_on(nc, js, trainer):
    bad = chat_jsonl(2) + b'{"messages": [{"role": "user", "content": "hi"}]}\n' + b"{not json\n"
    bad_job = make_job(await upload(js, bad, "broken.jsonl"))
    good_job = make_job(await upload(js, chat_jsonl(2)), steps=1, save_steps=0)
    await submit(js, bad_job)
    await submit(js, good_job)

    failed = await wait_status(js, bad_job.id, training.TERMINAL)
    assert failed.status == training.FAILED
    assert failed.error.param == "training_file"
    assert "broken.jsonl line 3" in failed.error.message and failed.error.code == "no_assistant_turn"
    assert (await wait_status(js, good_job.id, training.TERMINAL)).status == training.SUCCEEDED


async def test_unknown_method_option_and_paths_outside_the_data_dirs_fail_clearly(nc, js, trainer, tmp_path):
    file_id = await upload(js, chat_jsonl(2))
    bad_option = make_job(file_id)
    bad_option.peft.options = {"no_such_knob": 1}
    outside = tmp_path / "outside.jsonl"
    outside.write_bytes(chat_jsonl(2))
    escaping = make_job(str(trainer.data_dir / ".." / "outside.jsonl"))
    inside_path = trainer.data_dir / "ok.jsonl"
    inside_path.write_bytes(chat_jsonl(2))
    inside = make_job(str(inside_path), steps=1, save_steps=0)
    for job in (bad_option, escaping, inside):
        await submit(js, job)

    option_state = await wait_status(js, bad_option.id, training.TERMINAL)
    assert option_state.status == training.FAILED and "no_such_knob" in option_state.error.message
    escaped = await wait_status(js, escaping.id, training.TERMINAL)
    assert escaped.status == training.FAILED and escaped.error.code == "path_not_allowed"
    assert (await wait_status(js, inside.id, training.TERMINAL)).status == training.SUCCEEDED


async def test_cancel_stops_a_running_job_within_one_step(nc, js, trainer):
    events = Events()
    await events.start(nc)
    job = make_job(await upload(js, chat_jsonl()), steps=40, save_steps=0)
    await submit(js, job)
    await wait_until(lambda: len(events.of(job.id, "metrics")) >= 1)
    # As the edge does: the state first (compare-and-set), then the broadcast.
    kv = await js.key_value(names.TRAIN_JOBS_BUCKET)
    entry = await kv.get(job.id)
    state = msgspec.json.decode(entry.value, type=JobState)
    state.status, state.finished_at = training.CANCELLED, int(time.time())
    await kv.update(job.id, msgspec.json.encode(state), last=entry.revision)
    steps_at_cancel = len(events.of(job.id, "metrics"))
    await nc.publish(names.TRAIN_CANCEL, msgspec.json.encode(TrainCancel(id=job.id)))

    await wait_until(lambda: any("stopped" in e.message.lower() for e in events.of(job.id)), timeout=60)
    final = await job_state(js, job.id)
    assert final.status == training.CANCELLED
    assert len(events.of(job.id, "metrics")) <= steps_at_cancel + 1
    assert final.progress.step < 40
    assert (await js.stream_info(names.TRAIN_STREAM)).state.messages == 0


async def test_a_job_cancelled_while_queued_never_trains(nc, js, trainer_state):
    job = make_job(await upload(js, chat_jsonl(2)))
    kv = await js.key_value(names.TRAIN_JOBS_BUCKET)
    state = JobState(job=job, status=training.CANCELLED, created_at=int(time.time()))
    await kv.create(job.id, msgspec.json.encode(state))
    await submit(js, job)
    cfg = TrainerConfig(nats_url="", trainer_id="t-queued", state_dir=str(trainer_state), device="cpu")
    service = TrainerService(nc, cfg, TrainerMetrics(CollectorRegistry()))
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    await wait_until_async(lambda: _stream_empty(js))
    stop.set()
    await task
    assert (await job_state(js, job.id)).status == training.CANCELLED
    assert (await job_state(js, job.id)).attempts == 0


def test_a_trainer_killed_mid_job_hands_it_to_another_that_resumes_from_the_checkpoint(nats_server, tmp_path,
                                                                                        default_model_dir):
    asyncio.run(_kill_and_resume(nats_server, tmp_path, default_model_dir))


async def _kill_and_resume(nats_server, tmp_path: Path, default_model_dir: Path) -> None:
    import nats

    from infra import provision
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await provision.apply(js)
    # A short ack_wait on this test's server, so the dead trainer's job is redelivered quickly.
    info = await js.consumer_info(names.TRAIN_STREAM, names.TRAIN_DURABLE)
    await js.add_consumer(names.TRAIN_STREAM, dataclasses.replace(info.config, ack_wait=6.0))
    events = Events()
    await events.start(nc)
    state_dir = state_dir_with_models(tmp_path, default_model_dir)
    job = make_job(await upload(js, chat_jsonl()), steps=8, save_steps=3)
    await submit(js, job)
    first = _trainer_process(nats_server.url, state_dir, "first", tmp_path)
    try:
        await wait_until(lambda: [e.data["step"] for e in events.of(job.id, "checkpoint")] == [3], timeout=240)
        os.kill(first.pid, signal.SIGKILL)  # no goodbye: no nak, no state change
        first.wait()
        killed_at = max(e.data["step"] for e in events.of(job.id, "metrics"))
        second = _trainer_process(nats_server.url, state_dir, "second", tmp_path)
        try:
            final = await wait_status(js, job.id, training.TERMINAL, timeout=300)
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(60)
    finally:
        if first.poll() is None:
            first.kill()
    assert final.status == training.SUCCEEDED, final.error
    assert final.attempts == 2 and final.trainer.endswith("second")
    resumed = [e for e in events.of(job.id) if e.message.startswith("Resumed from checkpoint at step 3")]
    assert resumed, [e.message for e in events.of(job.id)]
    after = [e.data["step"] for e in events.of(job.id, "metrics") if e.created_at > resumed[0].created_at]
    assert after == [4, 5, 6, 7, 8]  # steps 1-3 (checkpointed) were not repeated
    assert killed_at >= 3
    await nc.close()


def _trainer_process(url: str, state_dir: Path, name: str, tmp_path: Path) -> subprocess.Popen:
    log = (tmp_path / f"trainer-{name}.log").open("wb")
    return subprocess.Popen([sys.executable, "-m", "services.trainer", "--nats-url", url, "--state-dir",
                             str(state_dir), "--trainer-id", f"trainer-{name}", "--device", "cpu",
                             "--keepalive", "2"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})


async def wait_until(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.1)


async def wait_until_async(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.1)


async def _stream_empty(js) -> bool:
    return (await js.stream_info(names.TRAIN_STREAM)).state.messages == 0


def _exposition(registry: CollectorRegistry) -> str:
    from prometheus_client import generate_latest
    return generate_latest(registry).decode()


SCRIPT = '''
import os, sys, json
print("script starting for", os.environ["CY_JOB_ID"], flush=True)
mode = sys.argv[1] if len(sys.argv) > 1 else "adapter"
if mode == "sleep":
    import time; time.sleep(60)
if mode == "hog":
    block = bytearray(3 * 1024 ** 3)
if mode == "adapter":
    import peft
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(os.environ["CY_BASE_MODEL_PATH"])
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    print("step 1 loss 0.5", flush=True)
    model.save_pretrained(os.environ["CY_OUTPUT_DIR"])
print("done", flush=True)
'''


async def _script_trainer(nc, trainer_state: Path, data_dir: Path, **cfg):
    config = TrainerConfig(nats_url="", trainer_id=f"t-{uuid.uuid4().hex[:6]}", state_dir=str(trainer_state),
                           data_dirs=[str(data_dir)], device="cpu", **cfg)
    service = TrainerService(nc, config, TrainerMetrics(CollectorRegistry()))
    stop = asyncio.Event()
    return stop, asyncio.create_task(service.run(stop))


async def test_training_scripts_are_off_unless_the_trainer_allows_them(nc, js, trainer):
    (trainer.data_dir / "train.py").write_text(SCRIPT)
    job = make_job(await upload(js, chat_jsonl(2)), script=str(trainer.data_dir / "train.py"))
    await submit(js, job)

    state = await wait_status(js, job.id, training.TERMINAL)
    assert state.status == training.FAILED and state.error.code == "scripts_disabled"


async def test_an_allowed_script_runs_limited_and_its_adapter_is_registered(nc, js, trainer_state, tmp_path):
    events = Events()
    await events.start(nc)
    data_dir = tmp_path / "scripts"
    data_dir.mkdir()
    (data_dir / "train.py").write_text(SCRIPT)
    stop, task = await _script_trainer(nc, trainer_state, data_dir, allow_scripts=True, script_timeout=3.0 * 60,
                                       script_memory_bytes=2 << 30)
    file_id = await upload(js, chat_jsonl(2))
    good = make_job(file_id, script=str(data_dir / "train.py"))
    hog = make_job(file_id, script=str(data_dir / "train.py"), script_args=["hog"])
    for job in (good, hog):
        await submit(js, job)
    try:
        ok = await wait_status(js, good.id, training.TERMINAL)
        assert ok.status == training.SUCCEEDED, ok.error
        assert ok.fine_tuned_model.startswith(f"{DEFAULT_MODEL_ID}:")
        assert "step 1 loss 0.5" in [e.message for e in events.of(good.id)]
        hogged = await wait_status(js, hog.id, training.TERMINAL)
        assert hogged.status == training.FAILED and hogged.error.code == "script_failed"
        assert "MemoryError" in hogged.error.message
    finally:
        stop.set()
        await task


async def test_a_script_past_its_time_limit_is_killed(nc, js, trainer_state, tmp_path):
    data_dir = tmp_path / "scripts"
    data_dir.mkdir()
    (data_dir / "train.py").write_text(SCRIPT)
    stop, task = await _script_trainer(nc, trainer_state, data_dir, allow_scripts=True, script_timeout=2.0)
    job = make_job(await upload(js, chat_jsonl(2)), script=str(data_dir / "train.py"), script_args=["sleep"])
    await submit(js, job)
    try:
        state = await wait_status(js, job.id, training.TERMINAL, timeout=60)
        assert state.status == training.FAILED and state.error.code == "script_timeout"
    finally:
        stop.set()
        await task
