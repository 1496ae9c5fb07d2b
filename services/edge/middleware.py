"""aiohttp middlewares: metrics around everything, and every failure as an OpenAI error body."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler, Middleware

from schemas.errors import BusError, ErrorCode
from services.edge import metrics as edge_metrics
from services.edge.errors import (
    error_json,
    error_response,
    http_error_code,
    http_error_response,
    plain_error_response,
    rejection_reason,
)
from services.edge.metrics import EdgeMetrics
from services.edge.openai.bodies import DONE, sse

log = logging.getLogger(__name__)

# A handler that started an SSE stream records it here, so a late failure goes out as an SSE event.
SSE_RESPONSE = web.RequestKey("sse_response", web.StreamResponse)

# When the request reached the edge (``time.perf_counter()``), for time to first token.
ARRIVED = web.RequestKey("arrived", float)
# The kind of stream (``sse``, ``websocket``) this request holds open, counted in ``llm_edge_open_streams``.
OPEN_STREAM = web.RequestKey("open_stream", str)

# nginx's "client closed request": the client went away before the answer was complete.
CLIENT_CLOSED = 499

# Routes that generate tokens: their time to first token is measured (the WebSocket's per request frame).
GENERATION_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses", "/api/v1/inference",
                               "/api/v1/inference/stream"})


def _route_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def metrics_middleware(metrics: EdgeMetrics) -> Middleware:
    """Count every request by route template and status, and time it to its last byte."""

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Time and count one request."""
        start = request[ARRIVED] = time.perf_counter()
        status = 500
        metrics.in_flight.inc()
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            status = CLIENT_CLOSED
            raise
        finally:
            metrics.in_flight.dec()
            route = _route_label(request)
            kind = request.get(OPEN_STREAM)
            if kind is not None:
                metrics.open_streams.labels(route, kind).dec()
            metrics.observe(route, status, time.perf_counter() - start)

    return observe


def first_output_metrics(metrics: EdgeMetrics) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """``on_response_prepare``: count an opening stream, and time a generation's first output.

    A stream's headers go out with its first chunk and a plain answer's with its whole body, so the
    moment a response is prepared is the moment its client sees the first token.
    """

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        """Observe one response as its headers go out."""
        arrived = request.get(ARRIVED)
        if arrived is None:  # answered before the metrics middleware (a CORS preflight)
            return
        route = _route_label(request)
        if isinstance(response, web.WebSocketResponse):
            kind = edge_metrics.WEBSOCKET
        elif response.content_type == "text/event-stream":
            kind = edge_metrics.SSE
        else:
            kind = edge_metrics.JSON
        if kind != edge_metrics.JSON:
            request[OPEN_STREAM] = kind
            metrics.open_streams.labels(route, kind).inc()
        if kind != edge_metrics.WEBSOCKET and route in GENERATION_ROUTES and response.status == 200:
            metrics.ttft.labels(route, kind).observe(time.perf_counter() - arrived)

    return on_prepare


async def _late_failure(request: web.Request, err: BusError) -> web.StreamResponse | None:
    """If an SSE stream is already open, end it with an error event; return it, else ``None``."""
    stream = request.get(SSE_RESPONSE)
    if stream is None or not stream.prepared:
        return None
    with contextlib.suppress(ConnectionResetError):  # the client is gone; nobody to tell
        await stream.write(sse(error_json(err)) + DONE)
    return stream


def error_middleware(retry_after: int, metrics: EdgeMetrics | None = None) -> Middleware:
    """Turn ``BusError``, aiohttp HTTP errors and unexpected exceptions into OpenAI error bodies;
    count refusals in ``llm_edge_rejected_requests_total``."""

    def refused(code: str) -> None:
        if metrics is not None:
            metrics.reject(rejection_reason(code))

    @web.middleware
    async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Answer one request; whatever fails becomes an OpenAI error body (or SSE error event)."""
        try:
            return await handler(request)
        except BusError as err:
            refused(err.code)
            return await _late_failure(request, err) or error_response(err, retry_after=retry_after)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            refused(http_error_code(exc.status))
            return http_error_response(exc, request.method, request.path)
        except HttpProcessingError as exc:
            # A body that breaks HTTP framing while it is read (a bad chunk, a short Content-Length).
            refused(ErrorCode.INVALID_REQUEST)
            return plain_error_response(400, ErrorCode.INVALID_REQUEST, f"malformed request body: {exc.message}")
        except ConnectionResetError:
            raise  # the client went away; aiohttp closes the connection
        except Exception:
            # The outermost boundary: a bug must cost one request a 500, never the edge.
            log.exception("unhandled error answering %s %s", request.method, request.path)
            err = BusError(ErrorCode.INTERNAL, "internal error in the edge")
            return await _late_failure(request, err) or error_response(err)

    return openai_errors
