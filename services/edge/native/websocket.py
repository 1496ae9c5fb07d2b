"""``GET /api/v1/inference/ws``: native streaming inference over one WebSocket, many requests at once.

The client sends JSON text (or binary) frames:

- a request: the body of ``POST /api/v1/inference/stream`` plus an optional ``"id"`` (its own
  name for the request; the edge numbers it when absent) and optionally ``"type": "request"``;
- ``{"type": "cancel", "id": ...}``: cancel that running request.

The edge answers with one JSON text frame per event, shaped as the native SSE events plus the
client ``id``: ``{"requestId", "id", "token"}`` per delta, then ``{"requestId", "id",
"finishReason", "usage", "done": true}``. Anything that goes wrong with one request or frame is
an ``{"id", "requestId", "error": {OpenAI error}}`` frame; the socket stays open. A cancelled
request ends with an error frame of code ``cancelled``. Closing the socket cancels every
request still running on it; cancels go out on the bus exactly as for an HTTP client that
disconnects.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Annotated, Literal

import msgspec
from aiohttp import WSMsgType, web

from schemas.errors import BusError, ErrorCode
from schemas.events import StreamEnd, StreamError, TokenDelta
from services.common.lifecycle import cancel_and_wait
from services.edge.openai import completions
from services.edge.http import json_depth
from services.edge.native import api as native_api
from services.edge.auth import rate_limit
from services.edge.errors import error_body, rejection_reason
from services.edge.metrics import WEBSOCKET, EdgeMetrics
from services.edge.native.api import NativeChunkFormatter
from services.edge.openai.translate import _decode
from services.edge.auth.rate_limit import UNLIMITED, Admission
from services.edge.state import EDGE, METRICS, Edge

log = logging.getLogger(__name__)

ClientId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class SocketFrame(msgspec.Struct):
    """What every client frame is first read as: its kind and the request it is about."""

    type: Literal["request", "cancel"] = "request"
    id: ClientId | None = None


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
        if self._closing or self._ws.closed:
            return
        async with self._send_lock:
            await self._ws.send_str(frame.decode())

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

    async def _refuse(self, client_id: str | None, err: BusError, request_id: str | None = None) -> None:
        """Answer one request or frame with an error frame (counted when it is a refusal)."""
        self._metrics.reject(rejection_reason(err.code))
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
        self._running[client_id] = asyncio.create_task(self._run(client_id, raw, arrived),
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

    async def _admit(self) -> Admission:
        limiter = self._edge.limiter
        if limiter is None:
            return UNLIMITED
        caller, overrides = rate_limit.caller_of(self._request)
        return await limiter.admit(caller, limiter.defaults.overridden(*overrides), stream=True)

    async def _run(self, client_id: str, raw: bytes, arrived: float) -> None:
        edge = self._edge
        admission, call, request_id = UNLIMITED, None, None
        try:
            parsed = completions.parse_body(raw, native_api.INFERENCE_STREAM, edge.config)
            req = completions.build_request(edge, parsed, native_api.INFERENCE_STREAM.id_prefix)
            request_id = req.id
            admission = await self._admit()
            async with edge.publisher.call(req, req.deadline - req.created) as call:
                fmt = NativeChunkFormatter(request_id=req.id, created=int(req.created), model=req.model,
                                           include_usage=True, client_id=client_id, framed=False)
                await self._pump(call, fmt, arrived)
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
            await admission.finish(completions.charged_tokens(call))

    def _first_output(self, arrived: float | None) -> None:
        """Time to first token of one socket request: from its frame's arrival to its first output frame."""
        if arrived is not None:
            self._metrics.ttft.labels(self._route, WEBSOCKET).observe(time.perf_counter() - arrived)

    async def _pump(self, call, fmt: NativeChunkFormatter, arrived: float | None = None) -> None:
        """Send each event as a frame until the terminal one."""
        while True:
            match await call.next_event():
                case TokenDelta(text=text) if text:
                    await self._send(fmt.delta(text))
                    self._first_output(arrived)
                    arrived = None
                case StreamEnd(finish_reason=finish_reason, usage=usage):
                    fmt.finish(finish_reason)
                    await self._send(fmt.usage(usage))
                    self._first_output(arrived)
                    return
                case StreamError(code=code, message=message, param=param):
                    raise BusError(code, message, param=param)


async def inference_ws(request: web.Request) -> web.WebSocketResponse:
    """Upgrade to a WebSocket (after auth, like ``/api/v1/inference``) and serve requests on it."""
    edge = request.app[EDGE]
    edge.check_accepting()
    ws = web.WebSocketResponse(heartbeat=edge.config.ws_heartbeat, max_msg_size=edge.config.max_body_bytes)
    await ws.prepare(request)
    await InferenceSocket(request, ws, edge).serve()
    return ws
