"""Starting a fine-tuning job, shared by the OpenAI and the native API.

The job protocol of ``schemas.training``: check what needs the bus (the model is known, the
uploaded files exist), create the ``JobState`` (``queued``) in KV, then publish the
``TrainingJob`` with ``Nats-Msg-Id`` = job id. A job that cannot be queued has its state removed
again, so a failed start leaves nothing behind.
"""

from __future__ import annotations

import time

import msgspec
from aiohttp import web

from schemas.errors import BusError, ErrorCode
from schemas.training import QUEUED, JobState
from services.common.worker_table import WorkerTable
from services.edge.auth.authenticator import PRINCIPAL
from services.edge.training.store import TRAINING, TrainingStore
from services.edge.training.translate import ParsedJob


def owner_of(request: web.Request) -> str | None:
    """Who is calling (API key id or JWT subject), recorded as the owner of what they create."""
    principal = request.get(PRINCIPAL)
    return principal.id if principal is not None else None


def store_of(request: web.Request) -> TrainingStore:
    """The training store of this edge."""
    return request.app[TRAINING]


async def resolve_model(table: WorkerTable, store: TrainingStore, name: str, param: str) -> str:
    """The canonical id of a model some engine serves or the registry lists; else ``model_not_found``."""
    served = table.resolve(name)
    if served is not None:
        return served.id
    registered = await store.registered_model(name)
    if registered is not None:
        return registered
    raise BusError(ErrorCode.MODEL_NOT_FOUND, f"The model '{name}' is neither served by an engine nor in the model "
                   "registry; fine-tune a model the platform knows (see GET /v1/models)", param=param)


async def start_job(store: TrainingStore, table: WorkerTable, parsed: ParsedJob) -> JobState:
    """Validate against the bus, record the job as ``queued`` and queue it; its state."""
    model = await resolve_model(table, store, parsed.job.model, parsed.model_param)
    for file_id, param in parsed.uploaded:
        try:
            await store.file_meta(file_id, param)
        except BusError as err:
            if err.code != ErrorCode.NOT_FOUND:
                raise
            raise BusError(ErrorCode.INVALID_REQUEST, f"'{param}': no uploaded file with id '{file_id}' "
                           "(upload it with POST /v1/files first)", param=param) from None
    job = msgspec.structs.replace(parsed.job, model=model)
    state = JobState(job=job, status=QUEUED, created_at=job.created_at or int(time.time()))
    await store.create_job(state)
    try:
        await store.submit(state)
    except BaseException:
        await store.forget_job(job.id)
        raise
    return state
