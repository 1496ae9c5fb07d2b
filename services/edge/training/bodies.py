"""Fine-tuning response bodies: job state, events, checkpoints and files as OpenAI and native objects.

Pure: values in, dicts out. The OpenAI job object carries two extensions beside OpenAI's own
fields (the official SDK keeps unknown fields): ``peft`` (the adaptation method and settings)
and ``progress`` (where a running job is), plus ``extra_hyperparameters`` (the trainer settings
OpenAI has no names for) and ``dataset_format``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import msgspec

from schemas.errors import BusError, ErrorCode
from schemas.training import RUNNING, Checkpoint, JobState, TrainEvent
from services.common.artifacts import FileMeta
from services.edge.training.translate import BASE_LEARNING_RATE

ORGANIZATION = "cy-llm"
_EXTRA = ("gradient_accumulation_steps", "warmup_ratio", "weight_decay", "max_seq_length", "save_steps",
          "logging_steps", "max_steps")


def _plain(value: msgspec.Struct) -> dict:
    """Every field, defaults included (the wire form omits them; a response shows them)."""
    return msgspec.structs.asdict(value)


def page_params(query: Mapping[str, str], *, default_limit: int, max_limit: int) -> tuple[str | None, int]:
    """``after`` and ``limit`` of a list request; a bad ``limit`` is ``invalid_request``."""
    raw = query.get("limit")
    limit = default_limit
    if raw is not None:
        try:
            limit = int(raw)
        except ValueError:
            raise BusError(ErrorCode.INVALID_REQUEST, f"'limit' must be an integer, got {raw!r}",
                           param="limit") from None
        if not 1 <= limit <= max_limit:
            raise BusError(ErrorCode.INVALID_REQUEST, f"'limit' must be in [1, {max_limit}], got {limit}",
                           param="limit")
    return query.get("after") or None, limit


def page(items: Sequence[dict], *, after: str | None, limit: int) -> dict:
    """OpenAI's cursor page: the ``limit`` items following the one with id ``after`` (all from the start)."""
    start = 0
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise BusError(ErrorCode.INVALID_REQUEST, f"'after' names no item of this list: {after!r}",
                           param="after")
        start = ids.index(after) + 1
    data = list(items[start:start + limit])
    return {"object": "list", "data": data, "has_more": start + limit < len(items),
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


def file_object(meta: FileMeta) -> dict:
    """OpenAI's ``file`` object."""
    return {"id": meta.id, "object": "file", "bytes": meta.bytes, "created_at": meta.created_at,
            "filename": meta.filename, "purpose": meta.purpose, "status": "processed", "expires_at": None,
            "status_details": None}


def openai_hyperparameters(state: JobState) -> dict:
    """The resolved ``n_epochs``, ``batch_size`` and ``learning_rate_multiplier`` of a job."""
    hp = state.job.hyperparameters
    return {"n_epochs": hp.n_epochs, "batch_size": hp.batch_size,
            "learning_rate_multiplier": round(hp.learning_rate / BASE_LEARNING_RATE, 12)}


def _estimated_finish(state: JobState, now: float) -> int | None:
    if state.status != RUNNING or state.progress.eta_s is None:
        return None
    return int(now + state.progress.eta_s)


def job_object(state: JobState, *, now: float) -> dict:
    """OpenAI's ``fine_tuning.job`` object, with the ``peft``/``progress``/``extra_hyperparameters`` extensions."""
    job = state.job
    hyperparameters = openai_hyperparameters(state)
    return {
        "id": job.id, "object": "fine_tuning.job", "created_at": state.created_at or job.created_at,
        "finished_at": state.finished_at, "model": job.model, "fine_tuned_model": state.fine_tuned_model,
        "organization_id": ORGANIZATION, "status": state.status, "hyperparameters": hyperparameters,
        "training_file": job.training_file, "validation_file": job.validation_file, "result_files": [],
        "trained_tokens": state.trained_tokens, "error": _plain(state.error) if state.error is not None else None,
        "seed": job.seed, "estimated_finish": _estimated_finish(state, now), "integrations": [],
        "metadata": job.metadata, "user_provided_suffix": job.suffix,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        # platform extensions
        "peft": {"method": job.peft.method, "r": job.peft.r, "alpha": job.peft.alpha, "dropout": job.peft.dropout,
                 "target_modules": job.peft.target_modules, "options": job.peft.options},
        "extra_hyperparameters": {name: getattr(job.hyperparameters, name) for name in _EXTRA},
        "dataset_format": job.dataset_format,
        "progress": _plain(state.progress),
    }


def event_object(event: TrainEvent) -> dict:
    """OpenAI's ``fine_tuning.job.event`` object."""
    return {"id": event.id, "object": "fine_tuning.job.event", "created_at": int(event.created_at),
            "level": event.level, "message": event.message, "data": event.data, "type": event.type}


def checkpoint_object(state: JobState, checkpoint: Checkpoint) -> dict:
    """OpenAI's ``fine_tuning.job.checkpoint`` object; the model name is ``<fine-tuned or base>:<checkpoint id>``."""
    served_as = state.fine_tuned_model or state.job.model
    return {"id": checkpoint.id, "object": "fine_tuning.job.checkpoint", "created_at": checkpoint.created_at,
            "fine_tuned_model_checkpoint": f"{served_as}:{checkpoint.id}", "fine_tuning_job_id": state.job.id,
            "step_number": checkpoint.step,
            "metrics": {"step": float(checkpoint.step), "train_loss": checkpoint.train_loss}}


def newest_first(items: Sequence, key: Callable) -> list:
    """``items`` sorted newest first by ``key`` (stable for equal keys: later items first)."""
    return [item for _, item in sorted(enumerate(items), key=lambda p: (key(p[1]), p[0]), reverse=True)]


def native_status(state: JobState, *, now: float) -> dict:
    """The native API's job status: where it is (epoch and step of total, loss, memory, ETA) and how it ended."""
    job, p = state.job, state.progress
    return {
        "jobId": job.id, "status": state.status, "baseModel": job.model, "method": job.peft.method,
        "trainingFile": job.training_file, "datasetFormat": job.dataset_format,
        "fineTunedModel": state.fine_tuned_model,
        "epoch": p.epoch, "totalEpochs": p.total_epochs or job.hyperparameters.n_epochs, "step": p.step,
        "totalSteps": p.total_steps, "percent": p.percent, "loss": p.loss, "learningRate": p.learning_rate,
        "memoryBytes": p.memory_bytes, "elapsedSeconds": p.elapsed_s, "etaSeconds": p.eta_s, "tokens": p.tokens,
        "estimatedFinish": _estimated_finish(state, now),
        "createdAt": state.created_at or job.created_at, "startedAt": state.started_at,
        "finishedAt": state.finished_at, "trainedTokens": state.trained_tokens, "trainer": state.trainer,
        "attempts": state.attempts, "error": _plain(state.error) if state.error is not None else None,
        "checkpoints": [{"id": c.id, "step": c.step, "createdAt": c.created_at, "trainLoss": c.train_loss}
                        for c in state.checkpoints],
    }


def native_event(event: TrainEvent) -> dict:
    """One event of the native progress stream."""
    return {"jobId": event.job_id, "eventId": event.id, "createdAt": event.created_at, "level": event.level,
            "type": event.type, "message": event.message, "data": event.data}
