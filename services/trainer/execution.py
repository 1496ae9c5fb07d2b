"""One job's run on a trainer: validate, train (resuming from the last checkpoint), publish the result.

The bus side (job state, events, checkpoint and result uploads) runs on the event loop; the
training itself runs in a worker thread (``pipeline``) and calls back between optimizer steps.
Those callbacks wait for the loop (a KV write and an event, about a millisecond), which keeps
progress, checkpoints and cancellation exact at step boundaries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import threading
import time
from pathlib import Path

import msgspec
import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from schemas import names, training
from schemas.registry import ADAPTER, BASE, ModelEntry
from schemas.training import Checkpoint, JobError, JobState, TrainingJob
from services.common import artifacts
from services.common.js_publish import election_error
from services.trainer import pipeline, script_runner
from services.trainer.config import TrainerConfig
from services.trainer.events import EventLog
from services.trainer.inputs import JobInputs, on_bus
from services.trainer.jobstate import JobStore
from services.trainer.metrics import TrainerMetrics
from services.trainer.pipeline import JobFailed, StepReport

log = logging.getLogger(__name__)

# A step's callback rides out leader elections (state, events, a checkpoint's upload): minutes at worst.
_CALLBACK_TIMEOUT = 300.0
# A job whose bus operations still fail after inputs.BUS_WINDOW goes back to the queue, a few times, then fails.
_BUS_ATTEMPTS = 5
_BUS_REQUEUE_DELAY = 5.0
_KEEP_CHECKPOINTS = 3  # older checkpoints of a job are deleted from the object store


class Interrupted(Exception):
    """The job goes back to the queue and resumes from its last checkpoint, after ``delay`` s.

    The trainer is stopping (no delay: another trainer may take it now), or the bus did not answer.
    """

    def __init__(self, message: str, *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class JobExecution:
    """Runs ``job`` to a terminal status, or raises ``Interrupted``."""

    def __init__(self, job: TrainingJob, *, config: TrainerConfig, store: JobStore, events: EventLog,
                 artifacts: ObjectStore, models: KeyValue, metrics: TrainerMetrics,
                 stopping: threading.Event) -> None:
        self.job = job
        self.config = config
        self.store = store
        self.events = events
        self.objects = artifacts
        self.models = models
        self.metrics = metrics
        self._stopping = stopping
        self._cancelled = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._work = config.work_dir / job.id
        self._attempt_start = 0.0
        self._attempt_first_step = 0
        self._attempts = 0

    def cancel(self) -> None:
        """Stop before the next optimizer step (called on a cancel broadcast)."""
        self._cancelled.set()

    # --- the whole run ---
    async def run(self) -> None:
        """Take the job from wherever it is to a terminal status (failures become ``failed``)."""
        state, _ = await self.store.get_or_create(self.job)
        if state.status in training.TERMINAL:
            log.info("job %s is already %s; dropping its message", self.job.id, state.status)
            return
        self._loop = asyncio.get_running_loop()
        try:
            await self._execute(state)
        except Interrupted:
            raise
        except JobFailed as exc:
            await self._fail(exc.error)
        except Exception as exc:  # any other failure ends the job with its cause, and the trainer goes on
            if election_error(exc) and self._attempts < _BUS_ATTEMPTS:
                # The bus, not the job: it did not answer for BUS_WINDOW s. Try again later from the checkpoint.
                log.warning("job %s: the bus did not answer (%s: %s); the job goes back to the queue", self.job.id,
                            type(exc).__name__, exc)
                raise Interrupted(f"bus unavailable ({type(exc).__name__})", delay=_BUS_REQUEUE_DELAY) from exc
            log.exception("job %s failed", self.job.id)
            await self._fail(JobError(code="internal_error", message=f"{type(exc).__name__}: {exc}"))
        finally:
            shutil.rmtree(self._work, ignore_errors=True)

    async def _execute(self, state: JobState) -> None:
        job = self.job
        self._attempts = state.attempts + 1
        state = await self._set_status(training.VALIDATING, attempts=self._attempts, trainer=self.config.trainer_id)
        await self.events.emit(job.id, f"Validating training file: {job.training_file}",
                               data={"status": training.VALIDATING})
        self._work.mkdir(parents=True, exist_ok=True)
        inputs = JobInputs(job, config=self.config, objects=self.objects, models=self.models, work=self._work)
        base_path = await inputs.base_model()
        train = await inputs.dataset(job.training_file, "training_file")
        valid = await inputs.dataset(job.validation_file, "validation_file") if job.validation_file else None
        self._check_cancel()
        if job.script is not None:
            await self._run_script(base_path, train)
            return
        prepared = await asyncio.to_thread(pipeline.prepare, job, base_path, train, valid, self.config.device,
                                             self._work)
        await self.events.emit(job.id, f"Files validated: {prepared.summary}", data={"dataset": prepared.summary})
        resume = await inputs.checkpoint(state)
        self._check_cancel()
        state = await self._start_running(prepared.total_steps, prepared.total_epochs)
        if resume is not None:
            await self.events.emit(job.id, f"Resumed from checkpoint at step {resume[1]} of {prepared.total_steps}",
                                   data={"status": training.RUNNING, "step": resume[1]})
        else:
            await self.events.emit(job.id, "Fine-tuning job started", data={"status": training.RUNNING})
        self._attempt_start, self._attempt_first_step = time.monotonic(), resume[1] if resume else 0
        outcome = await asyncio.to_thread(prepared.train, self._on_step, self._should_stop, self._on_checkpoint,
                                          resume[0] if resume else None)
        if outcome.cancelled:
            await self._stopped(outcome.steps)
            return
        out = self._work / "result"
        await asyncio.to_thread(prepared.save, out)
        await self._publish_result(out, full=prepared.method == "full", method=prepared.method,
                                   context_length=prepared.context_length, tokens=outcome.tokens)
        if outcome.valid_loss is not None:
            await self.events.emit(job.id, f"Validation loss: {outcome.valid_loss:.4f}", type="metrics",
                                   data={"step": outcome.steps, "valid_loss": outcome.valid_loss,
                                         "train_loss": outcome.loss})
        await self._succeeded()

    async def _run_script(self, base_path: Path, train: pipeline.DatasetRef) -> None:
        """A user-supplied training script (admin scope, trainer opt-in) in a limited subprocess."""
        job = self.job
        if not self.config.allow_scripts:
            raise JobFailed("scripts_disabled", "this trainer does not run training scripts (start it with "
                            "--allow-scripts)", "script")
        script = pipeline.local_dataset(job.script, self.config.allowed_data_dirs, "script").path
        out = self._work / "result"
        out.mkdir(parents=True, exist_ok=True)
        env = script_runner.script_env(job_id=job.id, base_model=base_path, training_file=train.path,
                                       output_dir=out, job_json=msgspec.json.encode(job))
        await self._start_running(0, 0)
        await self.events.emit(job.id, f"Training script {script.name} started", data={"status": training.RUNNING})

        async def on_line(text: str) -> None:
            await self.events.emit(job.id, text, data={"source": "script"})

        limits = script_runner.ScriptLimits(self.config.script_timeout, self.config.script_memory_bytes)
        finished = await script_runner.run_script(script, list(job.script_args), env, limits, on_line=on_line,
                                                  should_stop=self._should_stop)
        if not finished:
            await self._stopped(0)
            return
        kind = script_runner.result_kind(out)
        await self._publish_result(out, full=kind == "full", method="script", context_length=0, tokens=None)
        await self._succeeded()

    # --- callbacks from the training thread ---
    def _call(self, coro) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(_CALLBACK_TIMEOUT)

    def _should_stop(self) -> bool:
        return self._cancelled.is_set() or self._stopping.is_set()

    def _on_step(self, report: StepReport) -> None:
        self._call(self._record_step(report))

    def _on_checkpoint(self, step: int, directory: Path, loss: float | None) -> None:
        self._call(self._save_checkpoint(step, directory, loss))

    async def _record_step(self, r: StepReport) -> None:
        m = self.metrics
        m.steps.inc()
        m.tokens.inc(r.step_tokens)
        m.step_time.observe(r.step_seconds)
        if r.loss is not None:
            m.last_loss.labels(self.job.id).set(r.loss)
        done = r.step - self._attempt_first_step
        elapsed = time.monotonic() - self._attempt_start
        eta = elapsed / done * (r.total_steps - r.step) if done > 0 else None

        def change(s: JobState) -> JobState | None:
            if s.status in training.TERMINAL:
                return None
            s.progress = msgspec.structs.replace(
                s.progress, epoch=r.epoch, step=r.step, total_steps=r.total_steps,
                percent=round(100.0 * r.step / max(r.total_steps, 1), 2), loss=r.loss, learning_rate=r.learning_rate,
                memory_bytes=r.memory_bytes, elapsed_s=round(time.time() - (s.started_at or time.time()), 1),
                eta_s=None if eta is None else round(eta, 1), tokens=r.tokens)
            return s

        state = await self.store.update(self.job.id, change)
        if state.status == training.CANCELLED:
            self._cancelled.set()  # cancelled through the KV state (the broadcast may have been missed)
        every = max(self.job.hyperparameters.logging_steps, 1)
        if r.step % every == 0 or r.step == r.total_steps:
            await self.events.emit(self.job.id, f"Step {r.step}/{r.total_steps}: training loss={r.loss:.4f}",
                                   type="metrics", data=_metrics_data(r, eta))

    async def _save_checkpoint(self, step: int, directory: Path, loss: float | None) -> None:
        data = await asyncio.to_thread(artifacts.pack_dir, directory)
        name = artifacts.checkpoint_object(self.job.id, step)
        try:
            await on_bus(self.job.id, f"checkpoint {step} upload", lambda: self.objects.put(name, data))
        except nats.errors.Error as exc:  # the next checkpoint may make it; the job state never names this one
            log.warning("job %s: checkpoint at step %d not stored (%s); training goes on", self.job.id, step, exc)
            return
        self.metrics.checkpoints.inc()
        self.metrics.checkpoint_bytes.inc(len(data))
        ckpt = Checkpoint(id=f"ftckpt-{self.job.id.removeprefix('ftjob-')}-{step}", step=step,
                          created_at=int(time.time()), object_name=name, train_loss=loss)
        dropped: list[Checkpoint] = []

        def change(s: JobState) -> JobState:
            kept = [c for c in s.checkpoints if c.step != step] + [ckpt]
            dropped[:] = kept[:-_KEEP_CHECKPOINTS]
            s.checkpoints = kept[-_KEEP_CHECKPOINTS:]
            return s

        await self.store.update(self.job.id, change)
        for old in dropped:
            await _delete_quietly(self.objects, old.object_name)
        await self.events.emit(self.job.id, f"Checkpoint saved at step {step}", type="checkpoint",
                               data={"step": step, "id": ckpt.id, "object_name": name, "bytes": len(data)})

    # --- endings ---
    def _check_cancel(self) -> None:
        if self._stopping.is_set() and not self._cancelled.is_set():
            raise Interrupted("trainer stopping before training started")

    async def _stopped(self, steps: int) -> None:
        """Training stopped between steps: a cancel ends the job; a trainer shutdown hands it back."""
        if not self._cancelled.is_set():
            await self._set_status(training.QUEUED)
            await self.events.emit(self.job.id, f"Trainer {self.config.trainer_id} stopped at step {steps}; "
                                   "the job goes back to the queue", data={"status": training.QUEUED})
            raise Interrupted(f"stopped at step {steps}")
        # Whoever cancelled set the state (and the edge published the status event); make sure of the state.
        await self._set_status(training.CANCELLED, finished_at=int(time.time()))
        self.metrics.jobs.labels(training.CANCELLED).inc()
        self._forget_loss()
        await self.events.emit(self.job.id, f"Training stopped at step {steps}: the job was cancelled",
                               data={"step": steps})

    async def _publish_result(self, out: Path, *, full: bool, method: str, context_length: int,
                              tokens: int | None) -> None:
        """Store the result, register it for the engines, and mark the job succeeded."""
        job = self.job
        result_id = pipeline.result_id(job)
        data = await asyncio.to_thread(artifacts.pack_dir, out)
        name = artifacts.model_object(result_id) if full else artifacts.adapter_object(result_id)
        await on_bus(job.id, "result upload", lambda: self.objects.put(name, data))
        entry = ModelEntry(id=result_id, kind=BASE if full else ADAPTER, base=None if full else job.model,
                           source=f"artifact:{name}", format="safetensors" if full else "peft", method=method,
                           context_length=context_length, created_at=int(time.time()), job_id=job.id)
        await on_bus(job.id, "registry write",
                     lambda: self.models.put(names.slug(result_id), msgspec.json.encode(entry)))
        fine_tuned = result_id if full else f"{job.model}:{result_id}"
        await self._set_status(training.SUCCEEDED, finished_at=int(time.time()), fine_tuned_model=fine_tuned,
                               trained_tokens=tokens)
        await self.events.emit(job.id, f"New fine-tuned model created: {fine_tuned}",
                               data={"fine_tuned_model": fine_tuned, "object_name": name, "bytes": len(data)})

    async def _succeeded(self) -> None:
        self.metrics.jobs.labels(training.SUCCEEDED).inc()
        self._forget_loss()
        await self.events.emit(self.job.id, "The job has successfully completed", data={"status": training.SUCCEEDED})

    async def _fail(self, error: JobError) -> None:
        log.warning("job %s failed: %s: %s", self.job.id, error.code, error.message)
        await self._set_status(training.FAILED, finished_at=int(time.time()), error=error)
        self.metrics.jobs.labels(training.FAILED).inc()
        self._forget_loss()
        await self.events.emit(self.job.id, f"Job failed: {error.message}", level="error",
                               data={"status": training.FAILED, "code": error.code, "param": error.param})

    # --- state ---
    async def _set_status(self, status: str, **fields) -> JobState:
        """Move to ``status`` unless the job is already terminal (a cancel that won the race stands)."""
        def change(s: JobState) -> JobState | None:
            if s.status in training.TERMINAL:
                return None
            s.status = status
            for key, value in fields.items():
                setattr(s, key, value)
            return s

        state = await self.store.update(self.job.id, change)
        if state.status == training.CANCELLED and status != training.CANCELLED:
            self._cancelled.set()
        return state

    async def _start_running(self, total_steps: int, total_epochs: int) -> JobState:
        now = int(time.time())

        def change(s: JobState) -> JobState | None:
            if s.status in training.TERMINAL:
                return None
            s.status = training.RUNNING
            s.started_at = s.started_at or now
            s.progress = msgspec.structs.replace(s.progress, total_steps=total_steps, total_epochs=total_epochs)
            return s

        state = await self.store.update(self.job.id, change)
        if state.status == training.CANCELLED:
            self._cancelled.set()
        return state

    def _forget_loss(self) -> None:
        with contextlib.suppress(KeyError):  # no step ran: the series was never created
            self.metrics.last_loss.remove(self.job.id)


def _metrics_data(r: StepReport, eta: float | None) -> dict:
    return {"step": r.step, "total_steps": r.total_steps, "epoch": round(r.epoch, 4), "train_loss": r.loss,
            "learning_rate": r.learning_rate, "tokens": r.tokens, "step_seconds": round(r.step_seconds, 4),
            "memory_bytes": r.memory_bytes, "eta_s": None if eta is None else round(eta, 1)}


async def _delete_quietly(objects: ObjectStore, name: str) -> None:
    try:
        await objects.delete(name)
    except nats.errors.Error as exc:
        log.warning("could not delete old checkpoint %s: %s", name, exc)
