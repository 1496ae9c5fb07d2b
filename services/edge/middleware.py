"""aiohttp middlewares: metrics around everything, and every failure as an OpenAI error body."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from schemas.errors import BusError, ErrorCode
from services.edge.errors import error_json, error_response, http_error_response
from services.edge.metrics import EdgeMetrics
from services.edge.openai_format import DONE, sse

log = logging.getLogger(__name__)

# A handler that started an SSE stream records it here, so a late failure goes out as an SSE event.
SSE_RESPONSE = web.RequestKey("sse_response", web.StreamResponse)

# nginx's "client closed request": the client went away before the answer was complete.
CLIENT_CLOSED = 499


def _route_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def metrics_middleware(metrics: EdgeMetrics) -> Middleware:
    """Count every request by route template and status, and time it to its last byte."""

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Time and count one request."""
        start = time.perf_counter()
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
            metrics.observe(_route_label(request), status, time.perf_counter() - start)

    return observe


async def _late_failure(request: web.Request, err: BusError) -> web.StreamResponse | None:
    """If an SSE stream is already open, end it with an error event; return it, else ``None``."""
    stream = request.get(SSE_RESPONSE)
    if stream is None or not stream.prepared:
        return None
    with contextlib.suppress(ConnectionResetError):  # the client is gone; nobody to tell
        await stream.write(sse(error_json(err)) + DONE)
    return stream


def error_middleware(retry_after: int) -> Middleware:
    """Turn ``BusError``, aiohttp HTTP errors and unexpected exceptions into OpenAI error bodies."""

    @web.middleware
    async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Answer one request; whatever fails becomes an OpenAI error body (or SSE error event)."""
        try:
            return await handler(request)
        except BusError as err:
            return await _late_failure(request, err) or error_response(err, retry_after=retry_after)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return http_error_response(exc, request.method, request.path)
        except ConnectionResetError:
            raise  # the client went away; aiohttp closes the connection
        except Exception:
            # The outermost boundary: a bug must cost one request a 500, never the edge.
            log.exception("unhandled error answering %s %s", request.method, request.path)
            err = BusError(ErrorCode.INTERNAL, "internal error in the edge")
            return await _late_failure(request, err) or error_response(err)

    return openai_errors
