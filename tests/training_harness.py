"""Harness for the edge's fine-tuning tests — no tests in here.

``TrainerDouble`` plays the trainer on the real bus as ``schemas.training`` describes it: it
takes jobs from the durable consumer ``trainers``, writes ``JobState`` revisions and publishes
``TrainEvent``s. The fixtures run the edge in-process (aiohttp TestServer) against the real
nats-server of ``tests/conftest.py``, with a base model in the registry ``llm_models``.
"""

from __future__ import annotations

import time
import uuid

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from openai import AsyncOpenAI

from schemas import names
from schemas.registry import ModelEntry
from schemas.training import Checkpoint, JobState, Progress, TrainEvent, TrainingJob
from services.edge import EdgeConfig, create_app

BASE_MODEL = "test-org/base-model"
DATASET = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n' * 3

_encode = msgspec.json.Encoder().encode


class TrainerDouble:
    """The trainer's side of the job protocol, driven step by step by a test."""

    def __init__(self, js) -> None:
        self.js = js
        self._sub = None

    async def take(self, timeout: float = 5.0) -> TrainingJob:
        """Pull (and ack) the next queued job."""
        if self._sub is None:
            self._sub = await self.js.pull_subscribe_bind(names.TRAIN_DURABLE, names.TRAIN_STREAM)
        msgs = await self._sub.fetch(1, timeout=timeout)
        await msgs[0].ack()
        return msgspec.json.decode(msgs[0].data, type=TrainingJob)

    async def state(self, job_id: str) -> tuple[JobState, int]:
        """The job's state and KV revision."""
        kv = await self.js.key_value(names.TRAIN_JOBS_BUCKET)
        entry = await kv.get(job_id)
        return msgspec.json.decode(entry.value, type=JobState), entry.revision

    async def write(self, state: JobState) -> None:
        """Store a new revision of the job's state (compare-and-set on the current one)."""
        _, revision = await self.state(state.job.id)
        kv = await self.js.key_value(names.TRAIN_JOBS_BUCKET)
        await kv.update(state.job.id, _encode(state), last=revision)

    async def event(self, job_id: str, message: str = "", *, type: str = "message", **data) -> TrainEvent:
        """Publish one event on the job's subject."""
        event = TrainEvent(id=f"ftevent-{uuid.uuid4().hex[:12]}", job_id=job_id, created_at=time.time(),
                           type=type, message=message, data=data)
        await self.js.publish(names.train_job_events(job_id), _encode(event))
        return event

    async def status(self, job_id: str, status: str, **changes) -> JobState:
        """Move the job to ``status`` (state first, then its event), as the trainer does."""
        state, _ = await self.state(job_id)
        state.status = status
        for name, value in changes.items():
            setattr(state, name, value)
        await self.write(state)
        await self.event(job_id, f"Job {status}", status=status)
        return state

    async def step(self, job_id: str, step: int, total: int, loss: float) -> None:
        """Report one optimizer step: progress in the state, a metrics event."""
        state, _ = await self.state(job_id)
        state.progress = Progress(epoch=step / total, total_epochs=1, step=step, total_steps=total,
                                  percent=100.0 * step / total, loss=loss, learning_rate=2e-4, memory_bytes=1 << 30,
                                  elapsed_s=float(step), eta_s=float(total - step))
        await self.write(state)
        await self.event(job_id, type="metrics", step=step, total_steps=total, epoch=step / total,
                         train_loss=loss, eta_s=float(total - step))

    async def checkpoint(self, job_id: str, step: int, loss: float) -> None:
        """Record a checkpoint in the state."""
        state, _ = await self.state(job_id)
        state.checkpoints = [*state.checkpoints, Checkpoint(id=f"ftckpt-{step}", step=step, created_at=int(time.time()),
                                                            object_name=f"checkpoints/{job_id}/{step:08d}",
                                                            train_loss=loss)]
        await self.write(state)
        await self.event(job_id, f"Checkpoint at step {step}", type="checkpoint", step=step, id=f"ftckpt-{step}")


async def register_model(js, model_id: str = BASE_MODEL) -> None:
    """Put a base model into the registry ``llm_models``."""
    kv = await js.key_value(names.MODELS_BUCKET)
    await kv.put(names.slug(model_id), _encode(ModelEntry(id=model_id, source="/models/x")))


@pytest.fixture
def training_config(nats_server) -> EdgeConfig:
    """Edge config for training tests: short keep-alives, a small upload bound."""
    return EdgeConfig(nats_url=nats_server.url, training_keepalive=0.3, max_upload_bytes=64 << 10)


@pytest.fixture
async def edge(nc, js, training_config):
    """An HTTP client of the edge running in-process, with ``BASE_MODEL`` in the registry."""
    await register_model(js)
    async with TestClient(TestServer(create_app(training_config))) as client:
        yield client


@pytest.fixture
async def sdk(edge) -> AsyncOpenAI:
    """The official OpenAI SDK pointed at the edge."""
    client = AsyncOpenAI(base_url=str(edge.make_url("/v1")), api_key="unused", max_retries=0, timeout=10)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def trainer(js) -> TrainerDouble:
    """The trainer, played by the test."""
    return TrainerDouble(js)
