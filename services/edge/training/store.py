"""The edge's bus access for fine-tuning: uploaded files, job state, submission, cancel, events.

Files live in object store ``llm_artifacts`` as ``files/<file id>`` with ``FileMeta`` JSON as
the object's description; job state in KV ``llm_train_jobs`` (key = job id, compare-and-set on
every change); jobs are published to ``llm.v1.train.submit`` with ``Nats-Msg-Id`` = job id; events
are read from stream ``LLM_TRAIN_EVENTS`` with ordered (ephemeral) consumers. Buckets are bound
on first use, so an edge on an unprovisioned server still serves inference and answers training
calls with a 503 that says to run ``./cy infra apply``. Every bus failure becomes a ``BusError``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import BinaryIO

import msgspec
import nats.errors
import nats.js.errors
from aiohttp import web
from nats.aio.client import Client
from nats.js.api import DeliverPolicy, ObjectMeta

from schemas import names
from schemas.errors import BusError, ErrorCode
from schemas.registry import ModelEntry
from schemas.training import CANCELLED, TERMINAL, JobState, TrainCancel, TrainEvent
from services.common import artifacts, bus, js_publish
from services.common.artifacts import FileMeta
from services.common.bus import BUS_DOWN
from services.common.buckets import kv_values

log = logging.getLogger(__name__)

# JetStream 10077: the stream is at its bound (LLM_TRAIN max_msgs, discard new).
_STORE_FULL = 10077
_CAS_ATTEMPTS = 5
_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}\Z")
_UNAVAILABLE = (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError,
                *BUS_DOWN)

_state_decoder = msgspec.json.Decoder(JobState)
_event_decoder = msgspec.json.Decoder(TrainEvent)
_meta_decoder = msgspec.json.Decoder(FileMeta)
_model_decoder = msgspec.json.Decoder(ModelEntry)
_encode = msgspec.json.Encoder().encode


def _not_found(kind: str, ident: str, param: str | None = None) -> BusError:
    return BusError(ErrorCode.NOT_FOUND, f"no {kind} with id '{ident}'", param=param)


@contextlib.contextmanager
def _bus(what: str):
    """Turn a bus failure while doing ``what`` into a 503 ``unavailable`` error."""
    try:
        yield
    except _UNAVAILABLE as exc:
        raise BusError(ErrorCode.UNAVAILABLE, f"NATS did not answer while {what} ({type(exc).__name__}); "
                       "retry shortly") from None


class TrainingStore:
    """Files, job state, job submission and job events on the bus, for the edge's training routes."""

    def __init__(self, nc: Client, *, publish_timeout: float, publish_window: float = 0.0) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._publish_timeout = publish_timeout
        self._publish_window = publish_window  # retries of a publish caught in a leader election
        self._objects = None
        self._jobs = None
        self._models = None

    # --- binding ---

    async def _object_store(self):
        if self._objects is None:
            with _bus("binding the object store"):
                try:
                    self._objects = await self._js.object_store(names.ARTIFACTS_STORE)
                except nats.js.errors.BucketNotFoundError:
                    raise self._missing(f"object store {names.ARTIFACTS_STORE}") from None
        return self._objects

    async def _job_bucket(self):
        if self._jobs is None:
            with _bus("binding the job bucket"):
                try:
                    self._jobs = await self._js.key_value(names.TRAIN_JOBS_BUCKET)
                except nats.js.errors.BucketNotFoundError:
                    raise self._missing(f"KV bucket {names.TRAIN_JOBS_BUCKET}") from None
        return self._jobs

    @staticmethod
    def _missing(what: str) -> BusError:
        return BusError(ErrorCode.UNAVAILABLE, f"{what} does not exist on this NATS server; "
                        "run ./cy infra apply against it")

    # --- uploaded files ---

    async def put_file(self, meta: FileMeta, source: BinaryIO) -> FileMeta:
        """Store an uploaded file (read from ``source``, a binary file) under ``files/<id>``."""
        store = await self._object_store()
        with _bus("storing the file"):
            await store.put(artifacts.file_object(meta.id), source,
                            meta=ObjectMeta(name=artifacts.file_object(meta.id), description=_encode(meta).decode()))
        return meta

    async def file_meta(self, file_id: str, param: str | None = None) -> FileMeta:
        """The metadata of an uploaded file; ``not_found`` if there is none."""
        if not _ID.match(file_id):
            raise _not_found("file", file_id, param)
        store = await self._object_store()
        with _bus("looking the file up"):
            try:
                info = await store.get_info(artifacts.file_object(file_id))
            except nats.js.errors.NotFoundError:
                raise _not_found("file", file_id, param) from None
        return self._meta_of(info.description, file_id)

    @staticmethod
    def _meta_of(description: str | None, file_id: str) -> FileMeta:
        try:
            return _meta_decoder.decode(description or "")
        except msgspec.DecodeError:
            raise BusError(ErrorCode.INTERNAL, f"file '{file_id}' has no readable metadata in the object store "
                           "(was it stored by something other than the edge?)") from None

    async def list_files(self) -> list[FileMeta]:
        """Every uploaded file (objects under ``files/``), in no particular order."""
        store = await self._object_store()
        with _bus("listing files"):
            try:
                infos = await store.list(ignore_deletes=True)
            except nats.js.errors.NotFoundError:  # nats-py: an empty store
                return []
        out = []
        for info in infos:
            if info.deleted or not info.name.startswith(artifacts.FILES_PREFIX):
                continue
            try:
                out.append(_meta_decoder.decode(info.description or ""))
            except msgspec.DecodeError:
                log.warning("object %s has no FileMeta description; not listed", info.name)
        return out

    async def read_file_into(self, file_id: str, sink: BinaryIO) -> FileMeta:
        """Write an uploaded file's bytes into ``sink`` (its digest is checked); its metadata."""
        meta = await self.file_meta(file_id)
        store = await self._object_store()
        with _bus("reading the file"):
            try:
                await store.get(artifacts.file_object(file_id), writeinto=sink)
            except nats.js.errors.NotFoundError:
                raise _not_found("file", file_id) from None
        return meta

    async def delete_file(self, file_id: str) -> None:
        """Delete an uploaded file; ``not_found`` if there is none."""
        await self.file_meta(file_id)
        store = await self._object_store()
        with _bus("deleting the file"):
            try:
                await store.delete(artifacts.file_object(file_id))
            except nats.js.errors.NotFoundError:
                raise _not_found("file", file_id) from None

    # --- models ---

    async def registered_model(self, name: str) -> str | None:
        """The id of model ``name`` in the registry ``llm_models``, or None (also when there is no registry)."""
        if self._models is None:
            with _bus("binding the model registry"):
                try:
                    self._models = await self._js.key_value(names.MODELS_BUCKET)
                except nats.js.errors.BucketNotFoundError:
                    return None
        with _bus("looking the model up"):
            try:
                entry = await self._models.get(names.slug(name))
            except nats.js.errors.KeyNotFoundError:
                return None
        try:
            return _model_decoder.decode(entry.value or b"").id
        except msgspec.DecodeError:
            log.warning("registry entry of %r is not a ModelEntry", name)
            return None

    # --- jobs ---

    async def create_job(self, state: JobState) -> None:
        """Create a job's state (KV create: an existing id is a ``conflict``)."""
        kv = await self._job_bucket()
        with _bus("creating the job"):
            try:
                await kv.create(state.job.id, _encode(state))
            except nats.js.errors.KeyWrongLastSequenceError:
                raise BusError(ErrorCode.CONFLICT, f"a job with id '{state.job.id}' already exists",
                               param="jobId") from None

    async def forget_job(self, job_id: str) -> None:
        """Remove a job's state (a job that could not be queued)."""
        kv = await self._job_bucket()
        with contextlib.suppress(nats.errors.Error):
            await kv.delete(job_id)

    async def submit(self, state: JobState) -> None:
        """Queue the job on ``LLM_TRAIN`` (``Nats-Msg-Id`` = job id: a resubmission is dropped by JetStream)."""
        job = state.job
        try:
            await js_publish.publish(self._js, names.TRAIN_SUBMIT, _encode(job), msg_id=job.id,
                                     timeout=self._publish_timeout, window=self._publish_window, nc=self._nc)
        except nats.js.errors.APIError as exc:
            if exc.err_code == _STORE_FULL:
                raise BusError(ErrorCode.QUEUE_FULL, f"the training queue is full ({exc.description}); "
                               "retry later") from None
            raise BusError(ErrorCode.UNAVAILABLE, f"the training queue refused the job: {exc.description}") from None
        except nats.js.errors.NoStreamResponseError:
            raise BusError(ErrorCode.UNAVAILABLE, f"the training queue (stream {names.TRAIN_STREAM}) does not "
                           "exist or does not answer; run ./cy infra apply") from None
        except _UNAVAILABLE as exc:
            raise BusError(ErrorCode.UNAVAILABLE, f"the training queue did not acknowledge the job "
                           f"({type(exc).__name__})") from None

    async def job(self, job_id: str) -> tuple[JobState, int]:
        """A job's state and its KV revision; ``not_found`` if there is none."""
        if not _ID.match(job_id):
            raise _not_found("fine-tuning job", job_id)
        kv = await self._job_bucket()
        with _bus("reading the job"):
            try:
                entry = await kv.get(job_id)
            except nats.js.errors.KeyNotFoundError:
                raise _not_found("fine-tuning job", job_id) from None
        try:
            return _state_decoder.decode(entry.value or b""), entry.revision
        except msgspec.DecodeError as exc:
            raise BusError(ErrorCode.INTERNAL, f"the state of job '{job_id}' is unreadable: {exc}") from None

    async def jobs(self) -> list[JobState]:
        """Every job's current state, in no particular order (one pass over the bucket)."""
        kv = await self._job_bucket()
        with _bus("listing jobs"):
            values = await kv_values(kv, timeout=self._publish_timeout)
        out: list[JobState] = []
        for key, value in values.items():
            try:
                out.append(_state_decoder.decode(value))
            except msgspec.DecodeError:
                log.warning("job state %s is unreadable; not listed", key)
        return out

    async def cancel(self, job_id: str, reason: str = "cancelled by the API") -> JobState:
        """Set the job's status to ``cancelled`` (compare-and-set), record the event, broadcast ``TrainCancel``.

        A job that already ended is a ``conflict``.
        """
        kv = await self._job_bucket()
        for _ in range(_CAS_ATTEMPTS):
            state, revision = await self.job(job_id)
            if state.status in TERMINAL:
                raise BusError(ErrorCode.CONFLICT, f"job '{job_id}' has already {_ended(state.status)}; "
                               "only a queued or running job can be cancelled", param="fine_tuning_job_id")
            state.status = CANCELLED
            state.finished_at = int(time.time())
            with _bus("cancelling the job"):
                try:
                    await kv.update(job_id, _encode(state), last=revision)
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue  # the trainer changed it meanwhile: look again
            break
        else:
            raise BusError(ErrorCode.UNAVAILABLE, f"job '{job_id}' kept changing; could not cancel it, retry")
        await self.publish_event(TrainEvent(id=f"ftevent-{uuid.uuid4().hex[:24]}", job_id=job_id,
                                            created_at=time.time(), message=f"Job cancelled: {reason}",
                                            data={"status": CANCELLED}))
        with _bus("broadcasting the cancel"):
            await self._nc.publish(names.TRAIN_CANCEL, _encode(TrainCancel(id=job_id, reason=reason)))
            await bus.flush(self._nc, timeout=self._publish_timeout)
        return state

    # --- events ---

    async def publish_event(self, event: TrainEvent) -> None:
        """Append an event to the job's event subject (a status change the edge made)."""
        with _bus("recording the event"):
            try:
                await js_publish.publish(self._js, names.train_job_events(event.job_id), _encode(event),
                                         msg_id=event.id, timeout=self._publish_timeout,
                                         window=self._publish_window, nc=self._nc)
            except nats.js.errors.NoStreamResponseError:
                log.warning("stream %s is missing; event of %s not recorded", names.TRAIN_EVENTS_STREAM,
                            event.job_id)

    async def events(self, job_id: str, *, timeout: float) -> list[TrainEvent]:
        """Every event of a job so far, oldest first; ``timeout`` bounds the whole read."""
        subject = names.train_job_events(job_id)
        with _bus("reading the job's events"):
            try:
                last = (await self._js.get_last_msg(names.TRAIN_EVENTS_STREAM, subject)).seq or 0
            except nats.js.errors.NotFoundError:
                return []
        out: list[TrainEvent] = []
        deadline = time.monotonic() + timeout
        async with self.follow(job_id) as follower:
            while follower.last_seq < last:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BusError(ErrorCode.TIMEOUT, f"reading the events of job '{job_id}' took longer "
                                   f"than {timeout:g}s")
                event = await follower.next(left)
                if event is not None:
                    out.append(event)
        return out

    @contextlib.asynccontextmanager
    async def follow(self, job_id: str) -> AsyncIterator[EventFollower]:
        """An ordered consumer over the job's events from the first one; removed on exit."""
        with _bus("following the job's events"):
            try:
                sub = await self._js.subscribe(names.train_job_events(job_id), stream=names.TRAIN_EVENTS_STREAM,
                                               ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
            except nats.js.errors.NotFoundError:
                raise self._missing(f"stream {names.TRAIN_EVENTS_STREAM}") from None
        try:
            yield EventFollower(sub)
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()


class EventFollower:
    """Reads one job's events in order; ``last_seq`` is the stream sequence of the last one read."""

    def __init__(self, sub) -> None:
        self._sub = sub
        self.last_seq = 0

    async def next(self, timeout: float) -> TrainEvent | None:
        """The next event, or None if none came within ``timeout`` seconds (or it was unreadable)."""
        try:
            msg = await self._sub.next_msg(timeout=timeout)
        except nats.errors.TimeoutError:
            return None
        self.last_seq = msg.metadata.sequence.stream
        try:
            return _event_decoder.decode(msg.data)
        except msgspec.DecodeError:
            log.warning("unreadable event at %s seq %d skipped", msg.subject, self.last_seq)
            return None


def _ended(status: str) -> str:
    return {"succeeded": "succeeded", "failed": "failed", "cancelled": "been cancelled"}.get(status, status)


TRAINING = web.AppKey("training_store", TrainingStore)
