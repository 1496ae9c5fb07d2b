"""``/v1/batches``: create, retrieve, list and cancel batches (OpenAI's Batch API); ``add_routes``.

Create checks the input file (a ``batch`` file, every line calling the batch's ``endpoint``),
records the batch as ``validating`` and queues its start; the batch runners do the rest. Nothing
here waits for a line: answers come from KV ``llm_batches``.
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import AsyncIterator

import msgspec
from aiohttp import web

from schemas.batch import CANCELLING, TERMINAL, VALIDATING, BatchState
from schemas.errors import BusError, ErrorCode
from services.edge.auth import rate_limit
from services.edge.batch import lines
from services.edge.batch.runner import BatchRunner
from services.edge.batch.store import BatchStore
from services.edge.openai import responses
from services.edge.state import CONFIG, EDGE, METRICS
from services.edge.training.bodies import page, page_params
from services.edge.training.jobs import owner_of
from services.edge.training.store import TrainingStore

BATCHES = web.AppKey("batch_store", BatchStore)
BATCH_FILES = web.AppKey("batch_files", TrainingStore)
RUNNER = web.AppKey("batch_runner", BatchRunner)
_encode = msgspec.json.Encoder().encode


class BatchCreateBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/batches``."""

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None
    output_expires_after: dict | None = None  # accepted (a documented no-op: result files are kept)


def _json(body: object) -> web.Response:
    return web.Response(body=_encode(body), content_type="application/json")


def _invalid(message: str, param: str | None) -> BusError:
    return BusError(ErrorCode.INVALID_REQUEST, message, param=param)


def _parse_create(raw: bytes) -> BatchCreateBody:
    try:
        body = msgspec.json.decode(raw, type=BatchCreateBody)
    except msgspec.ValidationError as exc:
        raise _invalid(f"invalid batch: {exc}", None) from None
    except msgspec.DecodeError as exc:
        raise _invalid(f"the body is not valid JSON ({exc})", None) from None
    if body.endpoint not in lines.ENDPOINTS:
        raise _invalid(f"'endpoint' must be one of: {', '.join(lines.ENDPOINTS)}; got {body.endpoint!r}", "endpoint")
    if body.metadata is not None and len(body.metadata) > 16:
        raise _invalid("'metadata' holds at most 16 pairs", "metadata")
    return body


async def create_batch(request: web.Request) -> web.Response:
    """``POST /v1/batches``: validate the input file against ``endpoint``, record the batch, queue it."""
    edge = request.app[EDGE]
    edge.check_accepting()
    body = _parse_create(await request.read())
    window = lines.window_seconds(body.completion_window)
    files = request.app[BATCH_FILES]
    sink = io.BytesIO()
    try:
        meta = await files.read_file_into(body.input_file_id, sink)
    except BusError as err:
        if err.code != ErrorCode.NOT_FOUND:
            raise
        raise _invalid(f"no uploaded file with id '{body.input_file_id}'", "input_file_id") from None
    if meta.purpose != "batch":
        raise _invalid(f"file '{meta.id}' was uploaded with purpose '{meta.purpose}'; a batch needs a file "
                       "uploaded with purpose 'batch'", "input_file_id")
    parsed = lines.parse_lines(sink.getvalue().splitlines())
    for line in parsed:
        if line.url != body.endpoint:
            raise _invalid(f"line {line.index + 1} calls {line.url!r} but the batch's endpoint is {body.endpoint!r}; "
                           "every line of a batch calls its endpoint", "input_file_id")
    caller, overrides = rate_limit.caller_of(request)
    limits = edge.limiter.defaults.overridden(*overrides) if edge.limiter is not None else None
    now = int(time.time())
    state = BatchState(id=f"batch_{uuid.uuid4().hex}", endpoint=body.endpoint, input_file_id=meta.id,
                       completion_window=body.completion_window, status=VALIDATING, created_at=now,
                       expires_at=now + window, total=len(parsed), metadata=body.metadata, owner=owner_of(request),
                       caller=caller, rpm=limits.rpm if limits else 0, tpm=limits.tpm if limits else 0,
                       response_owner=responses.owner_of(request))
    store = request.app[BATCHES]
    await store.create(state)
    try:
        await store.publish_start(state.id)
    except BaseException:
        await store.forget(state.id)  # a batch that could not be queued leaves nothing behind
        raise
    return _json(lines.batch_object(state, (0, 0)))


async def _shown(store: BatchStore, state: BatchState) -> dict:
    """The batch object, with live counts while it runs."""
    if state.status in TERMINAL:
        return lines.batch_object(state)
    counts = await store.counts(state.id)
    return lines.batch_object(state, (counts["ok"], counts["err"] + counts["skip"]))


def _visible(request: web.Request, state: BatchState) -> bool:
    owner = owner_of(request)
    return owner is None or state.owner == owner


async def _own(request: web.Request) -> BatchState:
    store = request.app[BATCHES]
    batch_id = request.match_info["batch_id"]
    state, _ = await store.get(batch_id)
    if not _visible(request, state):
        raise BusError(ErrorCode.NOT_FOUND, f"no batch with id '{batch_id}'", param="batch_id")
    return state


async def get_batch(request: web.Request) -> web.Response:
    """``GET /v1/batches/{batch_id}``."""
    return _json(await _shown(request.app[BATCHES], await _own(request)))


async def list_batches(request: web.Request) -> web.Response:
    """``GET /v1/batches``: newest first, ``after`` / ``limit`` (default 20, at most 100) paging."""
    after, limit = page_params(request.query, default_limit=20, max_limit=100)
    store = request.app[BATCHES]
    states = [s for s in await store.states() if _visible(request, s)]
    states.sort(key=lambda s: (s.created_at, s.id), reverse=True)
    ids = [s.id for s in states]
    start = ids.index(after) + 1 if after in ids else 0
    shown = [lines.batch_object(s) if s.status in TERMINAL else None for s in states]
    for i in range(start, min(start + limit, len(states))):  # live counts only for the page shown
        if shown[i] is None:
            shown[i] = await _shown(store, states[i])
    items = [item if item is not None else {"id": s.id} for item, s in zip(shown, states, strict=True)]
    return _json(page(items, after=after, limit=limit))


async def cancel_batch(request: web.Request) -> web.Response:
    """``POST /v1/batches/{batch_id}/cancel``: ``cancelling`` now; the runners stop its lines and finish it."""
    state = await _own(request)
    store = request.app[BATCHES]
    now = int(time.time())

    def cancelling(s: BatchState) -> BatchState | None:
        if s.status in TERMINAL or s.status == CANCELLING:
            return None
        return msgspec.structs.replace(s, status=CANCELLING, cancelling_at=now)

    state = await store.change(state.id, cancelling)
    if state.status in TERMINAL and state.status != "cancelled":
        raise BusError(ErrorCode.CONFLICT, f"batch '{state.id}' has already ended ({state.status}); only a "
                       "running batch can be cancelled", param="batch_id")
    return _json(await _shown(store, state))


async def _context(app: web.Application) -> AsyncIterator[None]:
    """The batch store and this edge's batch runner (after the bus context; stopped before it)."""
    edge, config = app[EDGE], app[CONFIG]
    store = BatchStore(edge.nc, publish_timeout=config.publish_timeout, publish_window=config.publish_retry_window)
    files = TrainingStore(edge.nc, publish_timeout=config.publish_timeout, publish_window=config.publish_retry_window)
    app[BATCHES], app[BATCH_FILES] = store, files
    runner = BatchRunner(edge, store, files, concurrency=config.batch_concurrency, edge_metrics=app[METRICS])
    if config.batch_concurrency:
        await runner.start()
    app[RUNNER] = runner
    try:
        yield
    finally:
        await runner.stop()


def add_routes(app: web.Application) -> None:
    """Register ``/v1/batches`` and the batch runner; call after the edge's bus context is added."""
    app.cleanup_ctx.append(_context)
    r = app.router
    r.add_post("/v1/batches", create_batch)
    r.add_get("/v1/batches", list_batches)
    r.add_get("/v1/batches/{batch_id}", get_batch)
    r.add_post("/v1/batches/{batch_id}/cancel", cancel_batch)
