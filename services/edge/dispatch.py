"""Putting requests on the inference queue and taking them back: the edge's writes to the bus.

``Dispatcher.call(request)`` is an async context manager: entering registers the reply queue
and publishes the request to its lane (JetStream acknowledges before the edge answers
anything); leaving unregisters it and, if the request did not end on the bus, broadcasts a
``CancelRequest`` so no engine keeps generating for a client that is gone.
"""

from __future__ import annotations

import asyncio
import logging
import time

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext

from schemas import names
from schemas.errors import BusError, ErrorCode
from schemas.events import StreamEnd, StreamError, StreamEvent, Usage, encode
from schemas.inference import CancelRequest, InferenceRequest
from services.edge.queue_gauge import DrainRate
from services.edge.replies import PendingReply, ReplyRouter

log = logging.getLogger(__name__)

# JetStream 10077 (JSStreamStoreFailedF): "maximum messages exceeded" and friends — the bounded
# LLM_INFER stream with discard=new is full.
_STORE_FULL = 10077

# Connection states in which nothing can be published right now.
_BUS_DOWN = (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError,
             nats.errors.ConnectionReconnectingError, nats.errors.OutboundBufferLimitError,
             nats.errors.StaleConnectionError)


class Dispatcher:
    """Publishes requests to ``llm.v1.infer.submit.<lane>`` and cancels to ``llm.v1.infer.cancel``."""

    def __init__(self, nc: Client, js: JetStreamContext, router: ReplyRouter, *, publish_timeout: float,
                 queue: DrainRate | None = None) -> None:
        self._nc = nc
        self._js = js
        self.router = router
        self._publish_timeout = publish_timeout
        self._queue = queue

    def call(self, request: InferenceRequest, timeout: float) -> InferenceCall:
        """An in-flight request: ``async with dispatcher.call(req, timeout) as call: await call.next_event()``."""
        return InferenceCall(self, request, timeout)

    async def submit(self, request: InferenceRequest) -> None:
        """Publish ``request`` to its lane; raise ``BusError`` (``queue_full`` 429, ``no_worker_available`` 503)."""
        subject = names.infer_submit(names.lane_for_priority(request.priority))
        try:
            await self._js.publish(subject, encode(request), timeout=self._publish_timeout,
                                   headers={"Nats-Msg-Id": request.id})
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
        except _BUS_DOWN as exc:
            raise BusError(ErrorCode.NO_WORKER, f"the edge is not connected to NATS ({type(exc).__name__})") from None

    async def cancel(self, request_id: str, reason: str) -> None:
        """Broadcast ``CancelRequest`` (best effort: if NATS is down there is nobody to tell)."""
        try:
            await self._nc.publish(names.INFER_CANCEL, encode(CancelRequest(id=request_id, reason=reason)))
        except _BUS_DOWN as exc:
            log.warning("could not publish cancel of %s (%s): %s", request_id, reason, type(exc).__name__)


class InferenceCall:
    """One request from publication to its terminal event (see ``Dispatcher.call``)."""

    __slots__ = ("_cancel_reason", "_dispatcher", "_ended", "_loop_deadline", "_pending", "request", "timeout",
                 "usage")

    def __init__(self, dispatcher: Dispatcher, request: InferenceRequest, timeout: float) -> None:
        self._dispatcher = dispatcher
        self.request = request
        self.timeout = timeout
        self._pending: PendingReply | None = None
        loop = asyncio.get_running_loop()
        self._loop_deadline = loop.time() + max(0.0, request.deadline - time.time())
        self._ended = False
        self._cancel_reason: str | None = None
        # The usage reported by the request's ``StreamEnd`` (what rate limits charge), once it arrived.
        self.usage: Usage | None = None

    async def __aenter__(self) -> InferenceCall:
        router = self._dispatcher.router
        self._pending = router.register(self.request.id)
        try:
            await self._dispatcher.submit(self.request)
        except BaseException:
            router.unregister(self.request.id)
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self._dispatcher.router.unregister(self.request.id)
        reason = self._pending.abandon_reason if self._pending is not None else None
        if not self._ended or reason is not None:
            if reason is None:
                reason = self._cancel_reason or self._reason_for(exc_type)
            await self._dispatcher.cancel(self.request.id, reason)

    @staticmethod
    def _reason_for(exc_type: type[BaseException] | None) -> str:
        if exc_type is not None and issubclass(exc_type, (asyncio.CancelledError, ConnectionResetError)):
            return "client_disconnected"
        return "cancelled"

    def _take(self, event: StreamEvent) -> StreamEvent:
        if type(event) is StreamEnd:
            self._ended = True
            self.usage = event.usage
        elif type(event) is StreamError:
            self._ended = True
        return event

    def next_nowait(self) -> StreamEvent | None:
        """The next event if one has already arrived, else ``None``."""
        queue = self._pending.queue
        return self._take(queue.get_nowait()) if queue.qsize() else None

    async def next_event(self) -> StreamEvent:
        """The next event; raises ``BusError(timeout)`` at the request's deadline."""
        queue = self._pending.queue
        if queue.qsize():
            return self._take(queue.get_nowait())
        try:
            async with asyncio.timeout_at(self._loop_deadline):
                return self._take(await queue.get())
        except TimeoutError:
            self._cancel_reason = "timeout"
            raise BusError(ErrorCode.TIMEOUT, f"the request did not finish within its timeout of "
                                              f"{self.timeout:g}s") from None
