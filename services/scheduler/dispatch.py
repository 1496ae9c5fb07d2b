"""Handing one queued message to an engine, and settling it with JetStream.

``QueueDispatcher.admit`` decides synchronously (so capacity is reserved before the take loop looks
again) and returns the I/O that is left: send the original bytes to the chosen engine, retry
another on busy / no answer (withdrawing the offer from an engine that did not answer in time, so
a late accept cannot run it too), then ``ack`` (accepted, or answered with a typed error) or
``nak`` with a delay (no engine can take it now: it goes back to its lane for later).

A cacheable request (deterministic, not opted out) is first looked up in the prompt cache: a
hit is replayed on its reply subject and acknowledged without touching an engine; a miss is
dispatched with its ``cache_key`` set, so the engine stores the finished response.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from schemas import names
from schemas.cache import CachedResponse
from schemas.errors import ErrorCode
from schemas.events import StreamError, encode
from schemas.inference import CancelRequest, DispatchReply, InferenceRequest
from schemas.names import Lane
from services.common.bus import BUS_DOWN
from services.common.cache_key import cache_key, is_cacheable
from services.scheduler.cold_start import ColdStarter
from services.scheduler.metrics import Attempt, FailoverKind, Outcome, SchedulerMetrics
from services.scheduler.placement import Placement
from services.scheduler.prompt_cache import PromptCache
from services.common.recent import RecentIds
from services.scheduler.running import RunningRequests
from services.scheduler.triage import (Cancelled, Dispatchable, Duplicate, Expired, InFlight, Malformed, classify,
                                        dispatch_number, refusal_is_final, retry_delay)

log = logging.getLogger(__name__)

_reply_decoder = msgspec.json.Decoder(DispatchReply)

IoWork = Coroutine[Any, Any, None]


@dataclass
class RequestMemory:
    """Request ids the scheduler remembers: cancelled, accepted by an engine, being dispatched, and the
    accepted ones whose producer does not watch the engine (``running``: told ``worker_lost`` if it dies)."""

    cancelled: RecentIds
    accepted: RecentIds
    dispatching: set[str] = field(default_factory=set)
    running: RunningRequests = field(default_factory=RunningRequests)

    def while_dispatching(self, request_id: str, work: IoWork) -> IoWork:
        """``work``, with ``request_id`` counted as being dispatched from now until ``work`` ends, however it ends.

        Marked at once (not when ``work`` starts) so that a copy of its message the take loop
        admits meanwhile (a redelivery) is ``InFlight``. The only place ``dispatching`` changes.
        """
        self.dispatching.add(request_id)

        async def held() -> None:
            try:
                await work
            finally:
                self.dispatching.discard(request_id)

        return held()


class QueueDispatcher:
    """Routes messages taken from the queue to engines (see the module docstring).

    ``on_release`` is called whenever an engine answers (capacity may have changed);
    ``on_defer(lane, delay)`` when a message was handed back to ``lane`` for ``delay`` seconds.
    """

    def __init__(self, nc: Client, placement: Placement, metrics: SchedulerMetrics, memory: RequestMemory, *,
                 dispatch_timeout: float, max_attempts: int, retry_delay: float, max_retry_delay: float,
                 on_release: Callable[[], None], on_defer: Callable[[Lane, float], None]) -> None:
        self._nc = nc
        self._cache: PromptCache | None = None
        self._cold: ColdStarter | None = None
        self._placement = placement
        self._metrics = metrics
        self._memory = memory
        self._timeout = dispatch_timeout
        self._max_attempts = max_attempts
        self._retry_delay = retry_delay
        self._max_retry_delay = max_retry_delay
        self._on_release = on_release
        self._on_defer = on_defer

    @property
    def cache(self) -> PromptCache | None:
        """The prompt cache requests are answered from, if it is on."""
        return self._cache

    def use_cache(self, cache: PromptCache) -> None:
        """Answer cacheable requests from ``cache`` from now on (and have engines fill it)."""
        self._cache = cache

    def use_cold_start(self, cold: ColdStarter) -> None:
        """Load models only the registry knows on some engine before dispatching to them (cold start)."""
        self._cold = cold

    def admit(self, lane: Lane, msg: Msg) -> IoWork | None:
        """Decide what to do with ``msg`` now (reserving an engine slot); return the I/O left to run."""
        verdict = classify(msg.data, now=time.time(), cancelled=self._memory.cancelled,
                           accepted=self._memory.accepted, dispatching=self._memory.dispatching)
        match verdict:
            case Dispatchable(request=req) if msg.metadata.num_delivered > 1:
                # Redelivered: a replica may have died between an engine's accept and its ack.
                return self._memory.while_dispatching(req.id, self._unless_running(lane, msg, req))
            case Dispatchable(request=req):
                return self._memory.while_dispatching(req.id, self._admit_fresh(lane, msg, req))
            case InFlight():
                return None  # the copy being dispatched settles this message (acks are by stream sequence)
            case Duplicate():
                return self._settle(lane, msg, Outcome.DUPLICATE)
            case Cancelled():
                return self._settle(lane, msg, Outcome.CANCELLED)
            case Expired(request=req):
                return self._fail(lane, msg, req, ErrorCode.TIMEOUT,
                                  "the request's deadline passed while it waited in the queue", Outcome.EXPIRED)
            case Malformed() as bad:
                return self._reject(lane, msg, bad)

    async def _unless_running(self, lane: Lane, msg: Msg, req: InferenceRequest) -> None:
        """Settle a redelivered ``req`` as a duplicate if some engine runs (or just ran) it, else admit it.

        This makes dispatch idempotent by request id across replicas: the probe asks every live
        engine serving the model at once, so it costs one round trip, and only on redelivery.
        """
        if await self._running_somewhere(req):
            self._memory.accepted.add(req.id)
            await self._settle(lane, msg, Outcome.DUPLICATE)
            return
        await self._admit_fresh(lane, msg, req)

    def _admit_fresh(self, lane: Lane, msg: Msg, req: InferenceRequest) -> IoWork:
        """What ``admit`` does with a ``Dispatchable`` request: reserve an engine, then the I/O.

        A hit this replica keeps in memory needs no engine: it is replayed without reserving one.
        """
        cache = self._cache
        if cache is not None and is_cacheable(req):
            key = cache_key(req, self._placement.canonical(req.model))
            if (hit := cache.kept(key)) is not None:
                self._metrics.cache_lookup(True, local=True)
                return self._replay(lane, msg, req, hit, cache)
            worker = self._placement.reserve(req.model, request=req)
            return self._cached_or_dispatch(lane, msg, req, worker, cache, key)
        worker = self._placement.reserve(req.model, request=req)
        if worker is None:
            return self._unplaced(lane, msg, req)
        return self._dispatch(lane, msg, req, worker, msg.data)

    async def _running_somewhere(self, req: InferenceRequest) -> bool:
        """Whether any live engine serving ``req.model`` says it runs or recently finished ``req.id``."""
        probe = encode(msgspec.structs.replace(req, probe=True))
        workers = [s.worker for s in self._placement.table.live() if s.serves(req.model)]

        async def ask(worker: str) -> bool:
            try:
                resp = await self._nc.request(names.engine_generate(worker), probe, timeout=self._timeout)
                return _reply_decoder.decode(resp.data).accepted
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError, msgspec.DecodeError, *BUS_DOWN):
                return False  # a dead or silent engine runs nothing this client will see

        return any(await asyncio.gather(*(ask(w) for w in workers)))

    async def _replay(self, lane: Lane, msg: Msg, req: InferenceRequest, hit: CachedResponse,
                      cache: PromptCache) -> None:
        """Replay ``hit`` to ``req``'s producer and settle the message."""
        self._memory.accepted.add(req.id)
        try:
            await cache.replay(req, hit)
        except BUS_DOWN as exc:  # the client's edge sees its deadline or a lost stream; nothing to retry here
            log.warning("cached answer to %s not fully sent: %s", req.id, exc)
        await self._settle(lane, msg, Outcome.CACHED)

    async def _cached_or_dispatch(self, lane: Lane, msg: Msg, req: InferenceRequest, worker: str | None,
                                  cache: PromptCache, key: str) -> None:
        """Answer ``req`` from ``cache``, or dispatch it (to the reserved ``worker``) to be cached under ``key``."""
        hit = await cache.lookup(key)
        self._metrics.cache_lookup(hit is not None)
        if hit is not None:
            if worker is not None:
                self._placement.release(worker)  # reserved in admit(), not needed after all
                self._on_release()
            await self._replay(lane, msg, req, hit, cache)
        elif worker is None:
            await self._unplaced(lane, msg, req)
        else:
            await self._dispatch(lane, msg, msgspec.structs.replace(req, cache_key=key), worker)

    async def _dispatch(self, lane: Lane, msg: Msg, req: InferenceRequest, worker: str | None,
                        data: bytes | None = None) -> None:
        """Offer ``req`` to ``worker``, then to the next best engines, until one answers for good.

        ``data`` is ``req``'s bytes as taken from the queue, sent as they are when the offer's
        ``dispatch`` number is 0 (the first offer of the first delivery: no re-encoding).
        """
        taken_at = time.monotonic()
        tried: list[str] = []
        # A refusal another engine may not give (an adapter it lacks, a feature it does not support):
        # the next engine is tried, and this is reported if none takes the request.
        not_here: DispatchReply | None = None
        deliveries = msg.metadata.num_delivered
        while worker is not None:
            number = dispatch_number(deliveries, len(tried))
            offer = data if number == 0 and data is not None else \
                encode(msgspec.structs.replace(req, dispatch=number))
            reply = await self._attempt(worker, offer, req.id, number)
            if reply is not None and reply.accepted:
                await self._accepted(lane, msg, req, taken_at, worker, number)
                return
            if reply is not None and refusal_is_final(reply):
                await self._fail(lane, msg, req, reply.code or ErrorCode.INVALID_REQUEST,
                                 reply.message or f"engine {worker} refused the request", Outcome.REFUSED)
                return
            if req.id in self._memory.cancelled:
                await self._settle(lane, msg, Outcome.CANCELLED)
                return
            if reply is not None and not_here is None and (
                    reply.code == ErrorCode.UNSUPPORTED or (req.adapter and reply.code == ErrorCode.MODEL_NOT_FOUND)):
                not_here = reply  # another engine may support it, or have the adapter in its --adapter-dir
            tried.append(worker)
            worker = self._placement.reserve(req.model, exclude=tried, request=req) \
                if len(tried) < self._max_attempts else None
            if worker is not None:
                self._metrics.retry()
                await self._keep_alive(msg)
        if not_here is not None:  # waiting in the queue would not make the adapter or the feature appear
            await self._fail(lane, msg, req, not_here.code,
                             not_here.message or f"engine {not_here.worker} refused the request", Outcome.REFUSED)
            return
        await self._unplaced(lane, msg, req)

    async def _unplaced(self, lane: Lane, msg: Msg, req: InferenceRequest) -> None:
        """No engine took ``req``: back to the queue for later if some engine serves its model; else a model
        the registry knows is loaded first (cold start) and ``req`` dispatched; else ``model_not_found``."""
        if self._placement.serves(req.model):
            await self._defer(lane, msg)
        elif self._cold is not None:
            await self._cold_start(lane, msg, req, self._cold)
        else:
            await self._fail(lane, msg, req, ErrorCode.MODEL_NOT_FOUND, f"no live engine serves model {req.model!r}",
                             Outcome.MODEL_NOT_FOUND)

    async def _cold_start(self, lane: Lane, msg: Msg, req: InferenceRequest, cold: ColdStarter) -> None:
        """Have an engine load ``req.model`` (one load for all requests waiting on it), then dispatch ``req``."""
        started = await cold.start(req.model, req.deadline, keep_alive=lambda: self._keep_alive(msg))
        if started.ready and (worker := self._placement.reserve(req.model, request=req)) is not None:
            await self._dispatch(lane, msg, req, worker, msg.data)
        elif started.ready or started.retry:
            await self._defer(lane, msg)
        else:
            await self._fail(lane, msg, req, started.code or ErrorCode.MODEL_NOT_FOUND, started.message,
                             Outcome.MODEL_NOT_FOUND if started.code == ErrorCode.MODEL_NOT_FOUND else Outcome.REFUSED)

    async def _attempt(self, worker: str, data: bytes, request_id: str, number: int) -> DispatchReply | None:
        """Send offer ``number`` of ``request_id`` (its bytes) to one engine; its reply, or ``None`` if it did
        not answer (then the offer is withdrawn from it)."""
        reply, failed = None, False
        sent_at = time.monotonic()
        try:
            reply, failed = await self._request(worker, data)
            if reply is None and failed:
                await self._withdraw(worker, request_id, number)
        finally:
            answered_in = time.monotonic() - sent_at if reply is not None else None
            if self._placement.release(worker, reply, answered_in=answered_in, failed=failed):
                log.warning("engine %s keeps failing dispatches: circuit breaker open (no work until a probe "
                            "succeeds)", worker)
            self._metrics.circuits_open.set(self._placement.breakers.open_count())
            self._on_release()
        return reply

    async def _withdraw(self, worker: str, request_id: str, number: int) -> None:
        """Tell ``worker`` that offer ``number`` of ``request_id`` is off: if it only reads the offer now (its
        event loop was blocked past dispatch_timeout) it refuses it; if it accepted it meanwhile, it stops it
        without a word. Sent before the next offer goes out, so only one engine streams to the client."""
        try:
            await self._nc.publish(names.engine_cancel(worker), encode(CancelRequest(
                id=request_id, reason="dispatch_timeout", dispatch=number)))
        except BUS_DOWN as exc:  # the producer still follows only the newest offer's events
            log.warning("could not withdraw %s from %s: %s", request_id, worker, exc)

    async def _request(self, worker: str, data: bytes) -> tuple[DispatchReply | None, bool]:
        """The engine's reply (or None), and whether the engine is to blame for there being none."""
        try:
            resp = await self._nc.request(names.engine_generate(worker), data, timeout=self._timeout)
        except nats.errors.NoRespondersError:
            log.warning("engine %s has no generate subscription (gone): forgetting it", worker)
            self._placement.forget(worker)
            self._metrics.attempt(Attempt.NO_REPLY)
            return None, True
        except nats.errors.TimeoutError:
            log.warning("engine %s did not answer a dispatch within %.1fs", worker, self._timeout)
            self._metrics.attempt(Attempt.NO_REPLY)
            return None, True
        except BUS_DOWN as exc:  # our connection, not the engine: no strike against it
            log.warning("dispatch to %s not sent: %s", worker, exc)
            self._metrics.attempt(Attempt.NO_REPLY)
            return None, False
        try:
            reply = _reply_decoder.decode(resp.data)
        except msgspec.DecodeError as exc:
            log.warning("engine %s sent a malformed DispatchReply: %s", worker, exc)
            self._metrics.attempt(Attempt.NO_REPLY)
            return None, True
        self._metrics.attempt(Attempt.ACCEPTED if reply.accepted else
                              Attempt.REFUSED if refusal_is_final(reply) else Attempt.BUSY)
        return reply, False

    async def _accepted(self, lane: Lane, msg: Msg, req: InferenceRequest, taken_at: float, worker: str,
                        number: int) -> None:
        self._memory.accepted.add(req.id)
        if not req.producer_watches:  # a NATS-native producer: tell it if ``worker`` dies (it does not watch heartbeats)
            self._memory.running.add(req, worker, number, self._placement.table.get(worker))
        await self._jetstream(msg.ack())
        self._metrics.outcome(lane, Outcome.DISPATCHED)
        failover = None if not req.attempt else FailoverKind.MIGRATION if req.continuation else FailoverKind.REDISPATCH
        self._metrics.dispatched(lane, time.monotonic() - taken_at, time.time() - req.created if req.created else None,
                                 failover)

    async def _settle(self, lane: Lane, msg: Msg, outcome: Outcome) -> None:
        await self._jetstream(msg.ack())
        self._metrics.outcome(lane, outcome)

    async def _defer(self, lane: Lane, msg: Msg) -> None:
        delay = retry_delay(msg.metadata.num_delivered, self._retry_delay, self._max_retry_delay)
        await self._jetstream(msg.nak(delay=delay))
        self._on_defer(lane, delay)
        self._metrics.outcome(lane, Outcome.DEFERRED)

    async def _fail(self, lane: Lane, msg: Msg, req: InferenceRequest, code: str, message: str,
                    outcome: Outcome) -> None:
        await self._publish_error(req.reply_to, StreamError(id=req.id, code=str(code), message=message))
        await self._settle(lane, msg, outcome)

    async def _reject(self, lane: Lane, msg: Msg, bad: Malformed) -> None:
        log.warning("terminating a malformed message in lane %s: %s", lane, bad.reason)
        if bad.reply_to:
            await self._publish_error(bad.reply_to, StreamError(id=bad.request_id, code=ErrorCode.INVALID_REQUEST,
                                                                 message=bad.reason))
        await self._jetstream(msg.term())
        self._metrics.outcome(lane, Outcome.INVALID)

    async def _publish_error(self, reply_to: str, error: StreamError) -> None:
        try:
            await self._nc.publish(reply_to, encode(error))
        except BUS_DOWN as exc:
            log.warning("could not send %s error for request %s: %s", error.code, error.id, exc)

    async def _keep_alive(self, msg: Msg) -> None:
        # Each retry may wait dispatch_timeout again: restart the consumer's ack_wait clock.
        await self._jetstream(msg.in_progress())

    @staticmethod
    async def _jetstream(ack: Coroutine[Any, Any, None]) -> None:
        """Send an ack/nak/term/progress; if the bus is down, JetStream redelivers after ack_wait."""
        try:
            await ack
        except BUS_DOWN as exc:
            log.warning("acknowledgement not sent (message will be redelivered): %s", exc)
