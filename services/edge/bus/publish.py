"""Putting requests on the inference queue and taking them back: the edge's writes to the bus.

``RequestPublisher.call(request)`` is an async context manager: entering registers the reply queue
and publishes the request to its lane (JetStream acknowledges before the edge answers
anything); leaving unregisters it and, if the request did not end on the bus, broadcasts a
``CancelRequest`` so no engine keeps generating for a client that is gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext

from schemas import names
from schemas.errors import BusError, ErrorCode
from schemas.events import StreamEnd, StreamError, StreamEvent, StreamStart, TokenDelta, TokenLogprob, Usage, encode
from schemas.inference import CancelRequest, InferenceRequest
from services.common import js_publish
from services.common.bus import BUS_DOWN
from services.common.worker_table import WorkerTable
from services.edge.bus.failover import MIGRATABLE, Delivered, Impossible, begin, next_attempt
from services.edge.bus.queue_gauge import DrainRate
from services.edge.bus.replies import ClientConnection, PendingReply, ReplyRouter

log = logging.getLogger(__name__)

# JetStream 10077 (JSStreamStoreFailedF): "maximum messages exceeded" and friends — the bounded
# LLM_INFER stream with discard=new is full.
_STORE_FULL = 10077


class RequestPublisher:
    """Publishes requests to ``llm.v1.infer.submit.<lane>`` and cancels to ``llm.v1.infer.cancel``."""

    def __init__(self, nc: Client, js: JetStreamContext, router: ReplyRouter, *, publish_timeout: float,
                 queue: DrainRate | None = None, table: WorkerTable | None = None, max_failovers: int = 0,
                 on_failover: Callable[[str], None] | None = None, publish_window: float = 0.0) -> None:
        self._nc = nc
        self._js = js
        self.router = router
        self._publish_timeout = publish_timeout
        # How long a publish caught in a stream leader election is retried (same Nats-Msg-Id).
        self._publish_window = publish_window
        self._queue = queue
        # Failover needs to know whether another engine could take the request: without a table, none.
        self._table = table
        self.max_failovers = max_failovers if table is not None else 0
        self._on_failover = on_failover
        # The name of this edge's reply socket, put in every request it publishes ("" : none, NATS only).
        self.reply_socket = ""

    def call(self, request: InferenceRequest, timeout: float, msg_id: str | None = None) -> InferenceCall:
        """An in-flight request: ``async with publisher.call(req, timeout) as call: await call.next_event()``.

        ``msg_id`` replaces the request id as the publication's ``Nats-Msg-Id`` (an ``Idempotency-Key``).
        """
        return InferenceCall(self, request, timeout, msg_id)

    def serves_elsewhere(self, model: str, lost: str | None) -> bool:
        """Whether a live, non-draining engine other than ``lost`` serves ``model``."""
        return self._table is not None and any(s.worker != lost for s in self._table.candidates(model))

    def failover(self, kind: str) -> None:
        """Count one failover decision: ``redispatched``, ``migrated`` or ``impossible``."""
        if self._on_failover is not None:
            self._on_failover(kind)

    async def submit(self, request: InferenceRequest, msg_id: str | None = None) -> None:
        """Publish ``request`` to its lane; raise ``BusError`` (``queue_full`` 429, ``no_worker_available`` 503).

        ``Nats-Msg-Id`` is ``msg_id`` or the request id: JetStream drops a second publication with
        the same one inside the stream's duplicate window, which is what lets a publish caught in a
        leader election (a lost NATS node) be retried without running the request twice. It goes out
        marked ``producer_watches``: the edge follows the engine's heartbeats itself, so no
        scheduler sends it ``worker_lost``. It names the edge's reply socket, if it has one, so an
        engine on this host can send the events there (``services/common/reply_socket.py``).
        """
        subject = names.infer_submit(names.lane_for_priority(request.priority))
        if not request.producer_watches or request.reply_socket != self.reply_socket:
            # the edge watches every request it sends (to_request marks it already)
            request = msgspec.structs.replace(request, producer_watches=True, reply_socket=self.reply_socket)
        try:
            published = await js_publish.publish(self._js, subject, encode(request), msg_id=msg_id or request.id,
                                                 timeout=self._publish_timeout, window=self._publish_window,
                                                 nc=self._nc)
        except nats.js.errors.APIError as exc:
            if exc.err_code == _STORE_FULL or "exceeded" in (exc.description or ""):
                wait = self._queue.retry_after() if self._queue is not None else None
                raise BusError(ErrorCode.QUEUE_FULL, f"the inference queue is full ({exc.description}); "
                                                     f"retry in {wait or 'a few'} seconds", retry_after=wait) from None
            raise BusError(ErrorCode.NO_WORKER, f"the inference queue refused the request: {exc.description} "
                                                f"(JetStream error {exc.err_code})") from None
        except nats.js.errors.NoStreamResponseError:
            raise BusError(ErrorCode.NO_WORKER, f"the inference queue (stream {names.INFER_STREAM}) is not "
                                                "available; is infra provisioned?") from None
        except nats.errors.TimeoutError:
            # The request may be stored although its ack was lost: make sure nobody runs it for nothing.
            await self.cancel(request.id, "publish_timeout")
            raise BusError(ErrorCode.NO_WORKER, f"the inference queue did not acknowledge the request within "
                                                f"{self._publish_timeout:g}s") from None
        except nats.errors.MaxPayloadError:
            raise BusError(ErrorCode.INVALID_REQUEST, "the request is larger than the bus accepts "
                                                      f"({self._nc.max_payload} bytes)") from None
        except BUS_DOWN as exc:
            raise BusError(ErrorCode.NO_WORKER, f"the edge is not connected to NATS ({type(exc).__name__})") from None
        if not published.ours:
            # Only with an Idempotency-Key whose record was lost: the first copy's replies go to another call.
            raise BusError(ErrorCode.CONFLICT, "a request with this Idempotency-Key is already queued or running")

    async def cancel(self, request_id: str, reason: str) -> None:
        """Broadcast ``CancelRequest`` (best effort: if NATS is down there is nobody to tell)."""
        try:
            await self._nc.publish(names.INFER_CANCEL, encode(CancelRequest(id=request_id, reason=reason)))
        except BUS_DOWN as exc:
            log.warning("could not publish cancel of %s (%s): %s", request_id, reason, type(exc).__name__)


# Sends one token delta's text (and log-probabilities) to the client at once: True, or False (nothing
# sent) when it cannot right now. ``SseWriter.write_now``.
DeltaWriter = Callable[[str, list[TokenLogprob]], bool]


class InferenceCall:
    """One request from publication to its terminal event (see ``RequestPublisher.call``).

    If the engine running it is lost (``worker_lost`` from the liveness sweep, or the engine's own
    ``engine_failed``), the call re-publishes it as a new attempt (``failover.next_attempt``) and
    keeps the client's stream going; the client sees one continuous answer. It does the same when a
    second engine starts the request after the first one streamed tokens (the router follows the
    newest offer; the client must not get those tokens twice).

    Given a ``DeltaWriter`` (``write_through``), the call hands it each token delta that arrives
    while its reader waits in ``next_event`` with nothing queued, from the router's own callback:
    the reader is not woken for it. Deltas the writer declines, and every other event, are read
    from the queue as usual.
    """

    __slots__ = ("_bus_id", "_cancel_reason", "_delivered", "_ended", "_held", "_loop_deadline", "_msg_id",
                 "_pending", "_publisher", "_waiting", "_write", "finish_reason", "request", "timeout", "usage")

    # As a ``pump.Source``: one choice, so every event is choice 0's.
    index = 0
    width = 1

    def __init__(self, publisher: RequestPublisher, request: InferenceRequest, timeout: float,
                 msg_id: str | None = None) -> None:
        self._publisher = publisher
        self.request = request
        self.timeout = timeout
        self._msg_id = msg_id
        self._pending: PendingReply | None = None
        loop = asyncio.get_running_loop()
        self._loop_deadline = loop.time() + max(0.0, request.deadline - time.time())
        self._ended = False
        self._cancel_reason: str | None = None
        # The usage reported by the request's ``StreamEnd`` (what rate limits charge), once it arrived.
        self.usage: Usage | None = None
        self.finish_reason = ""
        self._bus_id = request.id  # the current attempt's id on the bus
        self._delivered = Delivered()
        self._held: StreamError | None = None  # a failover-able error seen by next_nowait, acted on by next_event
        self._waiting = False  # the reader waits in next_event for the queue (it has handled every earlier event)
        self._write: DeltaWriter | None = None

    async def __aenter__(self) -> InferenceCall:
        router = self._publisher.router
        self._pending = router.register(self.request.id)
        try:
            await self._publisher.submit(self.request, self._msg_id)
        except BaseException:
            router.unregister(self.request.id)
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self._publisher.router.unregister(self._bus_id)
        reason = self._pending.abandon_reason if self._pending is not None else None
        if not self._ended or reason is not None:
            if reason is None:
                reason = self._cancel_reason or self._reason_for(exc_type)
            await self._publisher.cancel(self._bus_id, reason)

    @staticmethod
    def _reason_for(exc_type: type[BaseException] | None) -> str:
        if exc_type is not None and issubclass(exc_type, (asyncio.CancelledError, ConnectionResetError)):
            return "client_disconnected"
        return "cancelled"

    def watch_client(self, client: ClientConnection) -> None:
        """Write the answer to ``client``: a client that stops reading is cut (see ``replies``), not buffered for."""
        self._pending.client = client

    def write_through(self, write: DeltaWriter) -> None:
        """Hand ``write`` the token deltas that arrive while the reader waits with nothing queued (see the class);
        nothing to do when the edge runs with ``--no-write-through``."""
        if not self._publisher.router.write_through:
            return
        self._write = write
        self._pending.sink = self._arrived

    def _arrived(self, event: StreamEvent) -> bool:
        """The router's sink: a token delta written at once, and recorded as delivered; False to queue ``event``."""
        if type(event) is not TokenDelta or not self._waiting or self._held is not None:
            return False
        if not self._write(event.text, event.logprobs):
            return False
        self._take(event)
        return True

    def cut_slow_consumer(self, why: str) -> None:
        """End the request because its client does not read (see ``replies``); it is cancelled on the way out."""
        self._publisher.router.cut(self._bus_id, why)

    @property
    def attempts(self) -> int:
        """How many times the request was re-published after losing its engine."""
        return self._delivered.attempt

    @property
    def text(self) -> str:
        """The answer delivered so far (all of it once the call ended with ``StreamEnd``)."""
        return self._delivered.text

    def _take(self, event: StreamEvent) -> StreamEvent:
        event = self._delivered.take(event, self.request.id)
        if type(event) is StreamEnd:
            self._ended = True
            self.usage = event.usage
            self.finish_reason = event.finish_reason
        elif type(event) is StreamError:
            self._ended = True
        return event

    def _failover_error(self, event: StreamEvent) -> StreamError | None:
        """The error to fail over on if ``event`` loses the request's engine, else ``None``."""
        if type(event) is TokenDelta:  # the hot path: one comparison
            return None
        if type(event) is StreamStart:
            if not self._delivered.restarted():
                return None
            return StreamError(id=event.id, code=ErrorCode.ENGINE_FAILED, dispatch=event.dispatch,
                               message=f"engine {event.worker} started this request after another engine had "
                                       "streamed part of it")
        if type(event) is StreamError and event.code in MIGRATABLE and self._publisher.max_failovers > 0:
            return event
        return None

    def next_nowait(self) -> StreamEvent | None:
        """The next event if one has already arrived, else ``None``."""
        queue = self._pending.queue
        if self._held is not None or not queue.qsize():
            return None
        event = queue.get_nowait()
        if (error := self._failover_error(event)) is not None:
            self._held = error  # failing over needs I/O: next_event does it
            return None
        return self._take(event)

    async def next_event(self) -> StreamEvent:
        """The next event; raises ``BusError(timeout)`` at the request's deadline."""
        while True:
            if self._held is not None:
                event, self._held = self._held, None
            else:
                event = await self._next_queued()
            if (error := self._failover_error(event)) is not None:
                outcome = await self._fail_over(error)
                if outcome is None:
                    continue  # a new attempt is on its way: keep waiting for its events
                event = outcome
            return self._take(event)

    async def _next_queued(self) -> StreamEvent:
        queue = self._pending.queue
        if queue.qsize():
            return queue.get_nowait()
        try:
            async with asyncio.timeout_at(self._loop_deadline):
                self._waiting = True
                try:
                    return await queue.get()
                finally:
                    self._waiting = False
        except TimeoutError:
            self._cancel_reason = "timeout"
            raise BusError(ErrorCode.TIMEOUT, f"the request did not finish within its timeout of "
                                              f"{self.timeout:g}s") from None

    async def _fail_over(self, error: StreamError) -> StreamEvent | None:
        """Re-publish after ``error`` lost the engine; ``None`` if it went out, else the event that ends the call."""
        pending, publisher = self._pending, self._publisher
        lost = None if pending.gap else pending.lost or pending.worker  # a gap on the bus loses no engine
        plan = next_attempt(self.request, self._delivered, max_attempts=publisher.max_failovers)
        if isinstance(plan, InferenceRequest) and not publisher.serves_elsewhere(self.request.model, lost):
            plan = Impossible(f"no other live engine serves model {self.request.model!r}")
        if isinstance(plan, Impossible):
            publisher.failover("impossible")
            return msgspec.structs.replace(error, message=f"{error.message}; {plan.message}")
        old, pending.lost = self._bus_id, None
        pending.restart()
        if isinstance(plan, StreamEnd):  # nothing left to generate
            await publisher.cancel(old, "worker_lost")
            return plan
        publisher.router.rebind(old, plan.id)
        self._bus_id = plan.id
        begin(self._delivered, plan.attempt)
        await publisher.cancel(old, "worker_lost")  # in case it is only cut off, not dead
        try:
            await publisher.submit(plan)
        except BusError as err:
            return StreamError(id=self.request.id, code=err.code, message=f"{error.message}; the request could "
                               f"not be re-published: {err.message}")
        publisher.failover("migrated" if plan.continuation else "redispatched")
        log.info("request %s re-published as %s after %s (%d tokens delivered)", self.request.id, plan.id,
                 error.message, self._delivered.tokens)
        return None
