"""The trainer service: takes fine-tuning jobs from the durable consumer ``trainers``, one at a time.

While a job runs, its message is kept alive with in-progress acks; the job's state lives in KV
``llm_train_jobs`` and every change is an event on ``llm.v1.train.job.<id>.event``. A job that
ends (succeeded, failed, cancelled) is acked; a trainer stopping mid-job naks it, and a trainer
that dies simply stops acking: either way JetStream redelivers the job to a trainer, which
resumes from the last checkpoint recorded in the job state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

import msgspec
import nats.errors
import nats.js.errors
import nats.micro
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.micro.request import Request

from schemas import names
from schemas.training import TrainCancel, TrainingJob
from services.common import gc_heap
from services.common.lifecycle import cancel_and_wait
from services.trainer.config import TrainerConfig
from services.trainer.events import EventLog
from services.trainer.execution import Interrupted, JobExecution
from services.trainer.jobstate import JobStore
from services.trainer.metrics import TrainerMetrics

log = logging.getLogger(__name__)

VERSION = "0.1.0"
_JOB_DECODER = msgspec.json.Decoder(TrainingJob)
_CANCEL_DECODER = msgspec.json.Decoder(TrainCancel)
_FETCH_WAIT = 1.0
_BUS_RETRY = 1.0
_REQUEUE_DELAY = 5.0


class TrainerStatus(msgspec.Struct, kw_only=True):
    """What ``cy-trainer.status`` answers: this trainer and its current job."""

    trainer: str
    job: str | None
    jobs_done: int
    started: float


class TrainerService:
    """One trainer process: the take loop, cancel broadcasts, and the micro ``status`` endpoint."""

    def __init__(self, nc: Client, config: TrainerConfig, metrics: TrainerMetrics) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.config = config
        self.metrics = metrics
        self.stopping = threading.Event()  # read by the training thread between optimizer steps
        self._current: JobExecution | None = None
        self._jobs_done = 0
        self._started = time.time()

    async def run(self, stop: asyncio.Event) -> None:
        """Serve jobs until ``stop`` is set; a job running then is interrupted and handed back."""
        store = JobStore(await self.js.key_value(names.TRAIN_JOBS_BUCKET))
        artifacts = await self.js.object_store(names.ARTIFACTS_STORE)
        models = await self.js.key_value(names.MODELS_BUCKET)
        self._deps = (store, EventLog(self.js), artifacts, models)
        async with contextlib.AsyncExitStack() as stack:
            sub = await self.nc.subscribe(names.TRAIN_CANCEL, cb=self._on_cancel)
            stack.push_async_callback(sub.unsubscribe)
            service = await nats.micro.add_service(
                self.nc, name=names.MICRO_TRAINER, version=VERSION,
                description="CY-LLM trainer (fine-tuning jobs)", metadata={"trainer": self.config.trainer_id})
            stack.push_async_callback(service.stop)
            # Its own subject (not nats.micro's default, the bare endpoint name "status").
            await service.add_endpoint(name="status", subject=names.TRAINER_STATUS, handler=self._status)
            psub = await self.js.pull_subscribe_bind(durable=names.TRAIN_DURABLE, stream=names.TRAIN_STREAM)
            stack.push_async_callback(psub.unsubscribe)
            gc_heap.started(self.metrics.gc_pause)
            log.info("trainer %s taking jobs from %s", self.config.trainer_id, names.TRAIN_DURABLE)
            take = asyncio.create_task(self._take_loop(psub))
            await stop.wait()
            self.stopping.set()
            await take

    async def _take_loop(self, psub) -> None:
        while not self.stopping.is_set():
            try:
                msgs = await psub.fetch(1, timeout=_FETCH_WAIT)
            except (TimeoutError, nats.errors.TimeoutError):
                continue  # idle
            except nats.errors.Error as exc:
                log.warning("fetch from %s failed (retrying): %s", names.TRAIN_DURABLE, exc)
                await asyncio.sleep(_BUS_RETRY)
                continue
            for msg in msgs:
                await self._handle(msg)

    async def _handle(self, msg: Msg) -> None:
        """Run one job message to its end, keeping it alive meanwhile; ack, or nak to hand it back."""
        try:
            job = _JOB_DECODER.decode(msg.data)
        except msgspec.ValidationError as exc:
            log.error("dropping an undecodable job message (%s): %s", exc, msg.data[:200])
            await _settle(msg.term())
            return
        store, events, artifacts, models = self._deps
        execution = JobExecution(job, config=self.config, store=store, events=events, artifacts=artifacts,
                                 models=models, metrics=self.metrics, stopping=self.stopping)
        self._current = execution
        keepalive = asyncio.create_task(self._keep_alive(msg))
        self.metrics.running.inc()
        try:
            await execution.run()
        except Interrupted as exc:
            log.info("job %s handed back: %s", job.id, exc)
            await _settle(msg.nak(delay=exc.delay))
            return
        except Exception:  # recording the failure itself failed (the bus is away): keep taking jobs
            log.exception("job %s could not be settled; it goes back to the queue", job.id)
            await _settle(msg.nak(delay=_REQUEUE_DELAY))
            return
        finally:
            self.metrics.running.dec()
            await cancel_and_wait(keepalive)
            self._current = None
        self._jobs_done += 1
        await _settle(msg.ack_sync())

    async def _keep_alive(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(self.config.keepalive)
            try:
                await msg.in_progress()
            except nats.errors.Error as exc:
                log.warning("in-progress ack failed: %s", exc)

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            cancel = _CANCEL_DECODER.decode(msg.data)
        except msgspec.ValidationError:
            log.warning("ignoring a malformed cancel: %s", msg.data[:200])
            return
        current = self._current
        if current is not None and current.job.id == cancel.id:
            log.info("cancel of running job %s (%s)", cancel.id, cancel.reason)
            current.cancel()

    async def _status(self, req: Request) -> None:
        current = self._current
        status = TrainerStatus(trainer=self.config.trainer_id, job=current.job.id if current else None,
                               jobs_done=self._jobs_done, started=self._started)
        await req.respond(msgspec.json.encode(status))


async def _settle(ack) -> None:
    """Ack/nak, logging (not raising) when the bus is gone: the message is then redelivered anyway."""
    try:
        await ack
    except (nats.errors.Error, nats.js.errors.Error) as exc:
        log.warning("could not settle a job message (it will be redelivered): %s", exc)

