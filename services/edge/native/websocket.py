"""``GET /api/v1/inference/ws``: native streaming inference over one WebSocket, many requests at once.

The client sends JSON text (or binary) frames:

- a request: the body of ``POST /api/v1/inference/stream`` plus an optional ``"id"`` (its own
  name for the request; the edge numbers it when absent), optionally ``"type": "request"``, and
  optionally ``"idempotencyKey"`` (or ``"idempotency_key"``): that endpoint's ``Idempotency-Key``;
- ``{"type": "cancel", "id": ...}``: cancel that running request.

The edge answers with one JSON text frame per event, shaped as the native SSE events plus the
client ``id``: ``{"requestId", "id", "token"}`` per delta, then ``{"requestId", "id",
"finishReason", "usage", "done": true}``; a request with ``tools`` gets its calls as ``{"requestId", "id",
"toolCalls": [...]}`` frames (``native.answers``). Anything that goes wrong with one request or frame is
an ``{"id", "requestId", "error": {OpenAI error}}`` frame; the socket stays open. A cancelled
request ends with an error frame of code ``cancelled``. Closing the socket cancels every
request still running on it; cancels go out on the bus exactly as for an HTTP client that
disconnects.

Each request frame takes the same admission path as an HTTP request (``http.admission``: the
socket's credential, its rate limits, the edge's prompt-cache hits, idempotency, the queue) and
is answered by the edge's event pump (``bus.pump``) through a ``FrameWriter``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Iterable
from typing import Annotated, Literal

import msgspec
from aiohttp import WSMsgType, web

from schemas.errors import BusError, ErrorCode
from schemas.events import StreamError, TokenLogprob, Usage
from services.common.lifecycle import cancel_and_wait
from services.edge.openai import completions
from services.edge.http import admission, json_depth
from services.edge.native import api as native_api
from services.edge.errors import error_body, rejection_reason
from services.edge.metrics import WEBSOCKET, EdgeMetrics
from services.edge.native.answers import NativeChunkFormatter, NativeToolChunkFormatter
from services.edge.openai.translate import _decode
from services.edge.bus.pump import pump
from services.edge.state import EDGE, METRICS, Edge

log = logging.getLogger(__name__)

ClientId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
IdempotencyKey = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]


class SocketFrame(msgspec.Struct):
    """What every client frame is first read as: its kind, the request it is about, and that request's
    idempotency key (the ``Idempotency-Key`` header of ``POST /api/v1/inference/stream``)."""

    type: Literal["request", "cancel"] = "request"
    id: ClientId | None = None
    idempotencyKey: IdempotencyKey | None = None
    idempotency_key: IdempotencyKey | None = None


_frame_decoder = msgspec.json.Decoder(SocketFrame)
_encode = msgspec.json.Encoder().encode


def error_frame(client_id: str | None, err: BusError, request_id: str | None = None) -> bytes:
    """An error frame: the OpenAI error object of ``err`` for request ``client_id``."""
    detail = error_body(err.code, err.message, err.param).error
    frame: dict = {"id": client_id, "requestId": request_id, "error": detail}
    if err.retry_after is not None:
        frame["retryAfter"] = err.retry_after
    return _encode(frame)


class InferenceSocket:
    """One client's socket: reads frames, runs each request as a task, writes their events."""

    def __init__(self, request: web.Request, ws: web.WebSocketResponse, edge: Edge) -> None:
        self._request = request
        self._ws = ws
        self._edge = edge
        self._running: dict[str, asyncio.Task] = {}
        self._cancelled: set[str] = set()
        self._stoppers: set[asyncio.Task] = set()  # cancel_and_wait of client-cancelled requests
        self._numbers = itertools.count(1)
        self._send_lock = asyncio.Lock()
        self._closing = False
        self._metrics: EdgeMetrics = request.app[METRICS]
        self._route = request.match_info.route.resource.canonical

    async def _send(self, frame: bytes) -> None:
        await self.send_frames((frame,))

    async def send_frames(self, frames: Iterable[bytes]) -> None:
        """Send JSON text frames (already UTF-8), in order, none interleaved with another request's."""
        if self._closing or self._ws.closed:
            return
        async with self._send_lock:
            for frame in frames:
                await self._ws.send_frame(frame, WSMsgType.TEXT)

    async def serve(self) -> None:
        """Read frames until the socket closes; then cancel what still runs."""
        try:
            async for msg in self._ws:
                if msg.type is WSMsgType.TEXT:
                    await self._on_frame(msg.data.encode())
                elif msg.type is WSMsgType.BINARY:
                    await self._on_frame(msg.data)
        finally:
            self._closing = True
            await cancel_and_wait(*self._running.values())

    def count_refusal(self, err: BusError) -> None:
        """Count an error answered with an error frame, when it is a refusal (``llm_edge_rejected_requests_total``)."""
        self._metrics.reject(rejection_reason(err.code))

    async def _refuse(self, client_id: str | None, err: BusError, request_id: str | None = None) -> None:
        """Answer one request or frame with an error frame (counted when it is a refusal)."""
        self.count_refusal(err)
        await self._send(error_frame(client_id, err, request_id))

    async def _on_frame(self, raw: bytes) -> None:
        arrived = time.perf_counter()
        try:
            json_depth.check_depth(raw, self._edge.config.max_json_depth)
            frame = _decode(_frame_decoder, raw)
        except BusError as err:
            await self._refuse(None, err)
            return
        if frame.type == "cancel":
            await self._cancel(frame.id)
            return
        client_id = frame.id if frame.id is not None else str(next(self._numbers))
        if client_id in self._running:
            await self._refuse(client_id, BusError(
                ErrorCode.INVALID_REQUEST, f"a request with id {client_id!r} is already running on this socket",
                param="id"))
            return
        self._running[client_id] = asyncio.create_task(self._run(client_id, frame, raw, arrived),
                                                       name=f"ws-request-{client_id}")

    async def _cancel(self, client_id: str | None) -> None:
        task = self._running.get(client_id) if client_id is not None else None
        if task is None:
            await self._refuse(client_id, BusError(
                ErrorCode.INVALID_REQUEST, f"no request with id {client_id!r} is running on this socket",
                param="id"))
            return
        self._cancelled.add(client_id)
        # Cancelled until it ends: one cancel() can be lost while the request awaits a bus round trip.
        stopper = asyncio.create_task(cancel_and_wait(task))
        self._stoppers.add(stopper)
        stopper.add_done_callback(self._stoppers.discard)

    async def _run(self, client_id: str, frame: SocketFrame, raw: bytes, arrived: float) -> None:
        """Admit and answer one request frame, exactly as ``POST /api/v1/inference/stream`` would (``admission``)."""
        edge, request_id = self._edge, None
        try:
            parsed = completions.parse_body(raw, native_api.INFERENCE_STREAM, edge.config)
            req = completions.build_request(edge, parsed, native_api.INFERENCE_STREAM.id_prefix)
            request_id = req.id
            async with admission.admitted(edge, self._request, req, n=1, stream=True,
                                          route=native_api.INFERENCE_STREAM.id_prefix,
                                          key=frame.idempotencyKey or frame.idempotency_key) as answer:
                request_id = answer.request_id
                formatter = NativeToolChunkFormatter if parsed.read_calls else NativeChunkFormatter
                fmt = formatter(request_id=answer.request_id, created=answer.created, model=answer.model,
                                include_usage=True, client_id=client_id, framed=False)
                await pump(answer.source, FrameWriter(self, fmt, client_id, answer.request_id, arrived))
        except BusError as err:
            await self._refuse(client_id, err, request_id)
        except asyncio.CancelledError:
            if client_id not in self._cancelled:
                raise  # the socket is closing
            await self._send(error_frame(client_id, BusError(ErrorCode.CANCELLED, "cancelled by the client"),
                                         request_id))
        finally:
            self._running.pop(client_id, None)
            self._cancelled.discard(client_id)

    def first_output(self, arrived: float) -> None:
        """Time to first token of one socket request: from its frame's arrival to its first output frame."""
        self._metrics.ttft.labels(self._route, WEBSOCKET).observe(time.perf_counter() - arrived)


class FrameWriter:
    """The event pump's writer for one request on a socket: one JSON text frame per event (see the module doc).

    Frames of events that arrived together go out under one hold of the socket's send lock.
    """

    def __init__(self, socket: InferenceSocket, fmt: NativeChunkFormatter, client_id: str, request_id: str,
                 arrived: float | None) -> None:
        self._socket = socket
        self._fmt = fmt
        self._client_id = client_id
        self._request_id = request_id
        self._arrived = arrived
        self._frames: list[bytes] = []

    async def open(self) -> None:
        """A socket request has nothing to open."""

    def delta(self, index: int, text: str, logprobs: list[TokenLogprob]) -> None:
        """The frames ``text`` completes: a token, or a tool call's start or arguments (none for an empty delta)."""
        self._frames.extend(self._fmt.delta_frames(text))

    def end(self, index: int, finish_reason: str) -> None:
        """What the formatter held back; the finish reason is remembered for the closing frame."""
        self._frames.extend(self._fmt.finish_frames(finish_reason))

    def done(self, usage: Usage | None) -> None:
        """The closing frame, with the usage."""
        self._frames.append(self._fmt.usage(usage))

    def error(self, error: StreamError | BusError) -> None:
        """An error frame; the socket stays open."""
        if type(error) is StreamError:
            error = BusError(error.code, error.message, param=error.param)
        self._socket.count_refusal(error)
        self._frames.append(error_frame(self._client_id, error, self._request_id))
        self._arrived = None  # an error is not a first token

    def flush(self) -> Awaitable[None] | None:
        """Send the frames of the events handed over since the last flush (``None`` if there are none)."""
        return self._send() if self._frames else None

    async def _send(self) -> None:
        await self._socket.send_frames(self._frames)
        self._frames.clear()  # the pump hands over nothing new before this write is done
        if self._arrived is not None:
            self._socket.first_output(self._arrived)
            self._arrived = None


async def inference_ws(request: web.Request) -> web.WebSocketResponse:
    """Upgrade to a WebSocket (after auth, like ``/api/v1/inference``) and serve requests on it."""
    edge = request.app[EDGE]
    edge.check_accepting()
    ws = web.WebSocketResponse(heartbeat=edge.config.ws_heartbeat, max_msg_size=edge.config.max_body_bytes)
    await ws.prepare(request)
    await InferenceSocket(request, ws, edge).serve()
    return ws
