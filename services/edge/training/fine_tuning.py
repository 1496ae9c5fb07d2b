"""OpenAI's fine-tuning API: ``/v1/fine_tuning/jobs`` create, list, retrieve, cancel, events, checkpoints.

Thin handlers: bodies are translated by ``training_translate``, the bus is ``training_store``,
responses are built by ``training_format``. A cancelled job that had already ended is a 409.
"""

from __future__ import annotations

import time

import msgspec
from aiohttp import web

from schemas.training import JobState
from services.edge.state import EDGE
from services.edge.training.bodies import (
    checkpoint_object,
    event_object,
    job_object,
    newest_first,
    page,
    page_params,
)
from services.edge.training.jobs import owner_of, start_job, store_of
from services.edge.training.translate import new_job_id, parse_openai_job

EVENTS_READ_TIMEOUT = 10.0
_encode = msgspec.json.Encoder().encode


def _json(body: object) -> web.Response:
    return web.Response(body=_encode(body), content_type="application/json")


def _job_id(request: web.Request) -> str:
    return request.match_info["job_id"]


async def create_job(request: web.Request) -> web.Response:
    """``POST /v1/fine_tuning/jobs``: validate, record as ``queued``, queue on ``LLM_TRAIN``; the job object."""
    parsed = parse_openai_job(await request.read(), job_id=new_job_id(), created_at=int(time.time()),
                              owner=owner_of(request))
    state = await start_job(store_of(request), request.app[EDGE].table, parsed)
    return _json(job_object(state, now=time.time()))


def _metadata_filter(query) -> dict[str, str]:
    """OpenAI's ``metadata[key]=value`` list filters."""
    return {k[len("metadata["):-1]: v for k, v in query.items() if k.startswith("metadata[") and k.endswith("]")}


def _matches(state: JobState, wanted: dict[str, str]) -> bool:
    have = state.job.metadata or {}
    return all(have.get(k) == v for k, v in wanted.items())


async def list_jobs(request: web.Request) -> web.Response:
    """``GET /v1/fine_tuning/jobs``: newest first, ``after`` / ``limit`` paging, ``metadata[k]=v`` filters."""
    after, limit = page_params(request.query, default_limit=20, max_limit=100)
    wanted = _metadata_filter(request.query)
    states = [s for s in await store_of(request).jobs() if _matches(s, wanted)]
    now = time.time()
    ordered = newest_first(states, key=lambda s: (s.created_at or s.job.created_at, s.job.id))
    return _json(page([job_object(s, now=now) for s in ordered], after=after, limit=limit))


async def get_job(request: web.Request) -> web.Response:
    """``GET /v1/fine_tuning/jobs/{job_id}``."""
    state, _ = await store_of(request).job(_job_id(request))
    return _json(job_object(state, now=time.time()))


async def cancel_job(request: web.Request) -> web.Response:
    """``POST /v1/fine_tuning/jobs/{job_id}/cancel``: a queued or running job becomes ``cancelled``."""
    state = await store_of(request).cancel(_job_id(request))
    return _json(job_object(state, now=time.time()))


async def list_events(request: web.Request) -> web.Response:
    """``GET /v1/fine_tuning/jobs/{job_id}/events``: newest first, ``after`` / ``limit`` paging."""
    after, limit = page_params(request.query, default_limit=20, max_limit=1000)
    store = store_of(request)
    job_id = _job_id(request)
    await store.job(job_id)  # 404 for an unknown job, not an empty list
    events = await store.events(job_id, timeout=EVENTS_READ_TIMEOUT)
    return _json(page([event_object(e) for e in reversed(events)], after=after, limit=limit))


async def list_checkpoints(request: web.Request) -> web.Response:
    """``GET /v1/fine_tuning/jobs/{job_id}/checkpoints``: newest first, ``after`` / ``limit`` paging."""
    after, limit = page_params(request.query, default_limit=10, max_limit=1000)
    state, _ = await store_of(request).job(_job_id(request))
    ordered = newest_first(state.checkpoints, key=lambda c: (c.step, c.created_at))
    return _json(page([checkpoint_object(state, c) for c in ordered], after=after, limit=limit))
