"""Job state in KV ``llm_train_jobs``: read, create, and compare-and-set updates.

Several writers touch a job (the trainer running it, an edge cancelling it), so every change
is a compare-and-set on the entry's revision, retried on conflict with the fresh value. On a
cluster, a read or a change that meets the bucket's leader election (its node lost) is retried for up to
``_ELECTION_WINDOW`` s: re-read and re-applied, so a write whose acknowledgement was lost is
not applied on top of itself with a stale revision.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec
import nats.js.errors
from nats.js.kv import KeyValue

from schemas import training
from schemas.names import token
from schemas.training import JobState, TrainingJob
from services.common.js_publish import through_elections

_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(JobState)
_MAX_CAS_TRIES = 20
_ELECTION_WINDOW = 30.0


class JobGone(Exception):
    """The job's KV entry was deleted while it was being updated."""


class JobStore:
    """Job states in one KV bucket; keys are job ids."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def get(self, job_id: str) -> tuple[JobState, int] | None:
        """The job's state and its revision, or None when there is no such job."""
        try:
            entry = await self.kv.get(token(job_id))
        except nats.js.errors.KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        return _DECODER.decode(entry.value), entry.revision

    async def get_or_create(self, job: TrainingJob) -> tuple[JobState, int]:
        """The job's state; a job published straight to the bus (no state yet) gets one, ``queued``."""
        return await through_elections(lambda: self._get_or_create(job), window=_ELECTION_WINDOW,
                                       what=f"job {job.id}: state read")

    async def _get_or_create(self, job: TrainingJob) -> tuple[JobState, int]:
        while True:
            found = await self.get(job.id)
            if found is not None:
                return found
            state = JobState(job=job, status=training.QUEUED, created_at=job.created_at or int(time.time()))
            try:
                revision = await self.kv.create(token(job.id), _ENCODER.encode(state))
                return state, revision
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # someone created it between our get and create: read theirs

    async def update(self, job_id: str, change: Callable[[JobState], JobState | None]) -> JobState:
        """Apply ``change`` to the current state and write it if the revision is unchanged; retry otherwise.

        ``change`` returns the new state, or None to leave the entry as it is (e.g. it is already
        terminal). Returns the state now stored.
        """
        return await through_elections(lambda: self._compare_and_set(job_id, change), window=_ELECTION_WINDOW,
                                       what=f"job {job_id}: state update")

    async def _compare_and_set(self, job_id: str, change: Callable[[JobState], JobState | None]) -> JobState:
        """One round of ``update``: read, apply, write if the revision is unchanged (retried on conflict)."""
        for _ in range(_MAX_CAS_TRIES):
            found = await self.get(job_id)
            if found is None:
                raise JobGone(job_id)
            state, revision = found
            new = change(msgspec.structs.replace(state))
            if new is None:
                return state
            try:
                await self.kv.update(token(job_id), _ENCODER.encode(new), last=revision)
                return new
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # a concurrent writer won: re-read and re-apply
        raise RuntimeError(f"job {job_id}: state kept changing under {_MAX_CAS_TRIES} compare-and-set attempts")
