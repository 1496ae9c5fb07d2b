"""The native training API of the seed documents: ``/api/v1/training/*``.

``start`` takes camelCase or snake_case bodies (``training_translate.parse_native_job``);
``status`` shows where a job is (epoch and step of total, percent, loss, learning rate, memory,
elapsed, ETA); ``{id}/stream`` replays the job's events and follows them live over SSE until
the job ends, then sends ``{"done": true, ...status}`` and closes (or closes without it when the
edge shuts down: the client follows again elsewhere). An idle stream gets an SSE
comment every ``EdgeConfig.training_keepalive`` seconds, so proxies keep it open.
"""

from __future__ import annotations

import time

import msgspec
from aiohttp import web

from schemas.auth import Scope, grants
from schemas.errors import BusError, ErrorCode
from schemas.training import TERMINAL, TrainEvent
from services.edge.auth.authenticator import PRINCIPAL
from services.edge.middleware import SSE_RESPONSE
from services.edge.openai.bodies import SSE_HEADERS, sse
from services.edge.state import CONFIG, EDGE
from services.edge.training.bodies import native_event, native_status, newest_first
from services.edge.training.jobs import owner_of, start_job, store_of
from services.edge.training.store import TrainingStore
from services.edge.training.translate import parse_native_job

KEEPALIVE = b": keep-alive\n\n"
# How often an idle stream looks at the job's state, to end when the job ended without a final event.
STATE_POLL = 1.0
_encode = msgspec.json.Encoder().encode


def _json(body: object) -> web.Response:
    return web.Response(body=_encode(body), content_type="application/json")


async def start(request: web.Request) -> web.Response:
    """``POST /api/v1/training/start``: queue a job; its status (``queued``)."""
    parsed = parse_native_job(await request.read(), created_at=int(time.time()), owner=owner_of(request))
    principal = request.get(PRINCIPAL)
    if parsed.job.script is not None and principal is not None and not grants(principal.scopes, Scope.ADMIN):
        raise BusError(ErrorCode.INSUFFICIENT_SCOPE, "a training 'script' needs the admin scope", param="script")
    state = await start_job(store_of(request), request.app[EDGE].table, parsed)
    return _json(native_status(state, now=time.time()))


async def status(request: web.Request) -> web.Response:
    """``GET /api/v1/training/status/{job_id}``."""
    state, _ = await store_of(request).job(request.match_info["job_id"])
    return _json(native_status(state, now=time.time()))


async def list_jobs(request: web.Request) -> web.Response:
    """``GET /api/v1/training/jobs``: every job's status, newest first (``?status=`` filters)."""
    wanted = request.query.get("status")
    states = [s for s in await store_of(request).jobs() if wanted is None or s.status == wanted]
    now = time.time()
    ordered = newest_first(states, key=lambda s: (s.created_at or s.job.created_at, s.job.id))
    return _json({"jobs": [native_status(s, now=now) for s in ordered]})


async def cancel(request: web.Request) -> web.Response:
    """``POST /api/v1/training/{job_id}/cancel``: the job's status after cancelling."""
    state = await store_of(request).cancel(request.match_info["job_id"])
    return _json(native_status(state, now=time.time()))


def _is_final(event: TrainEvent) -> bool:
    return event.type == "message" and event.data.get("status") in TERMINAL


async def _done(resp: web.StreamResponse, store: TrainingStore, job_id: str) -> None:
    state, _ = await store.job(job_id)
    await resp.write(sse(_encode({"done": True, **native_status(state, now=time.time())})))


async def stream(request: web.Request) -> web.StreamResponse:
    """``GET /api/v1/training/{job_id}/stream``: the job's events as SSE, replayed then live, until it ends."""
    store = store_of(request)
    job_id = request.match_info["job_id"]
    await store.job(job_id)  # an unknown job is a 404 before any SSE byte
    keepalive = request.app[CONFIG].training_keepalive
    resp = web.StreamResponse(headers=SSE_HEADERS)
    request[SSE_RESPONSE] = resp
    await resp.prepare(request)
    async with store.follow(job_id) as follower:
        last_write = time.monotonic()
        ended_seen = False  # the state said terminal at the last idle check
        while True:
            event = await follower.next(min(STATE_POLL, keepalive))
            if event is not None:
                await resp.write(sse(_encode(native_event(event))))
                last_write = time.monotonic()
                ended_seen = False
                if _is_final(event):
                    break
                continue
            if not request.app[EDGE].accepting:
                await resp.write_eof()  # shutting down: the client resumes on another edge (no "done")
                return resp
            state, _ = await store.job(job_id)
            if state.status in TERMINAL:
                if ended_seen:  # still no final event one poll later: the state is the truth
                    break
                ended_seen = True
            if time.monotonic() - last_write >= keepalive:
                await resp.write(KEEPALIVE)
                last_write = time.monotonic()
    await _done(resp, store, job_id)
    await resp.write_eof()
    return resp
