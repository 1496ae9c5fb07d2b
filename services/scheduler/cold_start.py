"""Cold start: a request for a model no live engine serves, but the model registry knows.

The scheduler asks the best engine (``load_placement.loader_candidates``) to load the model
over its control subject and waits for the load, bounded by the request's deadline and
``cold_start_timeout``; the engine's reply carries its new heartbeat, so the request is
dispatched at once. Concurrent requests for one cold model share one load. While waiting,
``keep_alive`` is called every few seconds (it restarts the message's ack_wait clock).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext

from schemas import names
from schemas.control import LoadModel, decode_reply
from schemas.errors import BusError, ErrorCode
from schemas.events import encode
from schemas.registry import ModelEntry
from services.common import model_registry
from services.common.load_placement import can_load, loader_candidates
from services.scheduler.placement import Placement

log = logging.getLogger(__name__)

KEEP_ALIVE_EVERY = 5.0


@dataclass(frozen=True)
class ColdStart:
    """How a cold start ended: ``ready`` (an engine serves the model now), ``retry`` later, or a typed error."""

    ready: bool = False
    retry: bool = False
    code: str | None = None
    message: str = ""


class ColdStarter:
    """Loads registered models on demand (see the module docstring)."""

    def __init__(self, nc: Client, js: JetStreamContext, placement: Placement, *, timeout: float,
                 attempts: int = 2) -> None:
        self._nc = nc
        self._js = js
        self._placement = placement
        self._timeout = timeout
        self._attempts = attempts
        self._loads: dict[str, asyncio.Future[ColdStart]] = {}

    async def start(self, model: str, deadline: float, keep_alive: Callable[[], Awaitable[None]]) -> ColdStart:
        """Have some engine load ``model`` (an id or alias in the registry); how it went."""
        try:
            entry = await model_registry.lookup(self._js, model)
        except BusError as exc:
            log.warning("cold start of %s: %s", model, exc.message)
            return ColdStart(retry=True)
        if entry is None:
            return ColdStart(code=ErrorCode.MODEL_NOT_FOUND,
                             message=f"no live engine serves model {model!r}, and the model registry does not know it")
        pending = self._loads.get(entry.id)
        if pending is None:  # one load per model, however many requests wait for it
            pending = asyncio.ensure_future(self._load(entry, deadline))
            self._loads[entry.id] = pending
            pending.add_done_callback(lambda _: self._loads.pop(entry.id, None))
        while True:
            wait = KEEP_ALIVE_EVERY if not deadline else min(KEEP_ALIVE_EVERY, deadline - time.time())
            if wait <= 0:
                return ColdStart(code=ErrorCode.TIMEOUT,
                                 message=f"the request's deadline passed while model {entry.id!r} was loading")
            done, _ = await asyncio.wait({pending}, timeout=wait)
            if done:
                return pending.result()
            await keep_alive()

    async def _load(self, entry: ModelEntry, deadline: float) -> ColdStart:
        tried: list[str] = []
        for _ in range(self._attempts):
            candidates = loader_candidates(entry, self._placement.table.live(), reserved=self._placement.reserved,
                                           exclude=tried)
            if not candidates:
                break
            worker = candidates[0].worker
            timeout = self._timeout if not deadline else min(self._timeout, deadline - time.time())
            if timeout <= 0:
                return ColdStart(code=ErrorCode.TIMEOUT, message=f"the deadline passed before {entry.id!r} could load")
            log.info("cold start: asking engine %s to load %s", worker, entry.id)
            began = time.monotonic()
            try:
                resp = await self._nc.request(names.engine_control(worker), encode(LoadModel(model=entry.id)),
                                              timeout=timeout)
                reply = decode_reply(resp.data)
            except nats.errors.NoRespondersError:
                tried.append(worker)
                continue
            except nats.errors.TimeoutError:
                return ColdStart(code=ErrorCode.TIMEOUT, message=f"engine {worker} did not load model {entry.id!r} "
                                                                 f"within {timeout:.0f}s")
            except msgspec.DecodeError as exc:
                log.warning("engine %s sent a malformed control reply: %s", worker, exc)
                tried.append(worker)
                continue
            if reply.ok:
                if reply.heartbeat is not None:
                    self._placement.table.observe(reply.heartbeat)
                log.info("cold start: %s loaded on %s in %.1fs (evicted %s)", entry.id, worker,
                         time.monotonic() - began, reply.evicted or "none")
                return ColdStart(ready=True)
            if reply.code == ErrorCode.ENGINE_BUSY:  # no room there now: another engine may have some
                tried.append(worker)
                continue
            return ColdStart(code=reply.code or ErrorCode.ENGINE_FAILED,
                             message=reply.message or f"engine {worker} could not load {entry.id!r}")
        if tried or any(can_load(s, entry) for s in self._placement.table.live()):
            return ColdStart(retry=True)  # every engine that could load it is busy now: wait in the queue
        return ColdStart(code=ErrorCode.MODEL_NOT_FOUND,
                         message=f"model {entry.id!r} is registered ({entry.format}, engine {entry.engine or 'any'}), "
                                 "but no live engine can load it")
