"""Answering one in-flight request over HTTP: gathered into one JSON body, or streamed as SSE.

A stream's headers go out with its first token, so an error before that (a full context, a
timeout while queued) is still a proper HTTP status; after it, an error is an SSE error event
followed by ``[DONE]``.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from schemas.errors import BusError
from schemas.events import StreamEnd, StreamError, StreamEvent, StreamStart, TokenDelta, Usage
from services.edge.dispatch import InferenceCall
from services.edge.errors import error_json
from services.edge.middleware import SSE_RESPONSE
from services.edge.openai_format import DONE, SSE_HEADERS, ChunkFormatter, sse

BodyBuilder = Callable[..., bytes]


def _raise(event: StreamError) -> None:
    raise BusError(event.code, event.message, param=event.param)


async def collect(call: InferenceCall, build: BodyBuilder, *, created: int, model: str) -> web.Response:
    """Wait for the whole answer and return it as one JSON body built by ``build``."""
    parts: list[str] = []
    while True:
        match await call.next_event():
            case TokenDelta(text=text):
                parts.append(text)
            case StreamEnd(finish_reason=finish_reason, usage=usage):
                body = build(request_id=call.request.id, created=created, model=model, text="".join(parts),
                             finish_reason=finish_reason, usage=usage)
                return web.Response(body=body, content_type="application/json")
            case StreamError() as error:
                _raise(error)


async def _first_output(call: InferenceCall) -> StreamEvent:
    """Skip ``StreamStart``; return the first event that produces output, raising a ``StreamError``."""
    while True:
        event = await call.next_event()
        if type(event) is StreamError:
            _raise(event)
        if type(event) is not StreamStart:
            return event


def _render(event: StreamEvent, fmt: ChunkFormatter, out: list[bytes]) -> bool:
    """Append the SSE bytes of ``event`` to ``out``; return whether it ended the stream."""
    match event:
        case TokenDelta(text=text):
            if text:
                out.append(fmt.delta(text))
            return False
        case StreamEnd(finish_reason=finish_reason, usage=usage):
            out.append(fmt.finish(finish_reason))
            out.append(fmt.usage(usage))
            out.append(DONE)
            return True
        case StreamError(code=code, message=message, param=param):
            out.append(sse(error_json(BusError(code, message, param=param))))
            out.append(DONE)
            return True
    return False  # StreamStart (e.g. a re-dispatch to another engine): nothing to send


async def _pump(resp: web.StreamResponse, call: InferenceCall, fmt: ChunkFormatter, event: StreamEvent,
                lead: bytes) -> None:
    """Write events as they arrive until the terminal one; events already queued share one write."""
    out: list[bytes] = [lead] if lead else []
    while True:
        ended = _render(event, fmt, out)
        while not ended and (queued := call.next_nowait()) is not None:
            ended = _render(queued, fmt, out)
        if out:
            await resp.write(b"".join(out))
            out = []
        if ended:
            return
        event = await call.next_event()


async def stream(request: web.Request, call: InferenceCall, fmt: ChunkFormatter) -> web.StreamResponse:
    """Stream the answer as OpenAI SSE chunks, ending with ``data: [DONE]``."""
    first = await _first_output(call)
    resp = web.StreamResponse(headers=SSE_HEADERS)
    request[SSE_RESPONSE] = resp
    await resp.prepare(request)
    try:
        await _pump(resp, call, fmt, first, fmt.start())
    except BusError as err:  # the deadline passed mid-stream
        await resp.write(sse(error_json(err)) + DONE)
    return resp


async def replay(request: web.Request, fmt: ChunkFormatter, text: str, finish_reason: str,
                 usage: Usage) -> web.StreamResponse:
    """Send a stored, finished response as one SSE stream (an ``Idempotency-Key`` retry)."""
    resp = web.StreamResponse(headers=SSE_HEADERS)
    request[SSE_RESPONSE] = resp
    await resp.prepare(request)
    await resp.write(fmt.start() + (fmt.delta(text) if text else b"") + fmt.finish(finish_reason) + fmt.usage(usage)
                     + DONE)
    return resp
