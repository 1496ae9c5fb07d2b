"""Answering one in-flight request over HTTP: gathered into one JSON body, or streamed as SSE.

A stream's headers go out with its first token, so an error before that (a full context, a
timeout while queued) is still a proper HTTP status; after it, an error is an SSE error event
followed by ``[DONE]``.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from schemas.errors import BusError
from schemas.events import StreamEnd, StreamError, StreamEvent, StreamStart, TokenDelta, TokenLogprob, Usage
from services.edge.bus.publish import InferenceCall
from services.edge.errors import error_json
from services.edge.middleware import SSE_RESPONSE
from services.edge.openai.bodies import DONE, SSE_HEADERS, ChunkFormatter, sse

BodyBuilder = Callable[..., bytes]


def raise_error(event: StreamError) -> None:
    """Raise ``event`` as the ``BusError`` it carries (before the first byte: an HTTP error answer)."""
    raise BusError(event.code, event.message, param=event.param)


async def collect(call: InferenceCall, build: BodyBuilder, *, created: int, model: str) -> web.Response:
    """Wait for the whole answer and return it as one JSON body built by ``build``.

    A request that asked for ``logprobs`` hands ``build`` every token's entries as ``logprobs``.
    """
    parts: list[str] = []
    entries: list[TokenLogprob] = []
    while True:
        match await call.next_event():
            case TokenDelta(text=text, logprobs=logprobs):
                parts.append(text)
                if logprobs:
                    entries.extend(logprobs)
            case StreamEnd(finish_reason=finish_reason, usage=usage):
                extra = {"logprobs": entries} if call.request.sampling.logprobs is not None else {}
                body = build(request_id=call.request.id, created=created, model=model, text="".join(parts),
                             finish_reason=finish_reason, usage=usage, **extra)
                return web.Response(body=body, content_type="application/json")
            case StreamError() as error:
                raise_error(error)


def render_delta(event: TokenDelta, fmt: ChunkFormatter, out: list[bytes]) -> None:
    """Append the SSE chunk of one delta (none for an empty one), with its log-probabilities if it has any."""
    if event.logprobs:
        out.append(fmt.delta_logprobs(event.text, event.logprobs))
    elif event.text:
        out.append(fmt.delta(event.text))


def error_event(error: StreamError | BusError) -> bytes:
    """An error after the first SSE byte: the OpenAI error body as an SSE event, then ``[DONE]``."""
    if type(error) is StreamError:
        error = BusError(error.code, error.message, param=error.param)
    return sse(error_json(error)) + DONE


async def _first_output(call: InferenceCall) -> StreamEvent:
    """Skip ``StreamStart``; return the first event that produces output, raising a ``StreamError``."""
    while True:
        event = await call.next_event()
        if type(event) is StreamError:
            raise_error(event)
        if type(event) is not StreamStart:
            return event


def _render(event: StreamEvent, fmt: ChunkFormatter, out: list[bytes]) -> bool:
    """Append the SSE bytes of ``event`` to ``out``; return whether it ended the stream."""
    match event:
        case TokenDelta():
            render_delta(event, fmt, out)
            return False
        case StreamEnd(finish_reason=finish_reason, usage=usage):
            out.append(fmt.finish(finish_reason))
            out.append(fmt.usage(usage))
            out.append(DONE)
            return True
        case StreamError():
            out.append(error_event(event))
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
        await resp.write(error_event(err))
    return resp


async def replay(request: web.Request, fmt: ChunkFormatter, texts: list[str], finish_reason: str,
                 usage: Usage) -> web.StreamResponse:
    """Send a stored, finished response (one delta per entry of ``texts``) as one SSE stream, in one write.

    The chunks are those ``stream`` sends for the same events (an empty delta sends none): an
    ``Idempotency-Key`` retry, or a prompt-cache hit answered by the edge.
    """
    resp = web.StreamResponse(headers=SSE_HEADERS)
    request[SSE_RESPONSE] = resp
    await resp.prepare(request)
    out = [fmt.start()]
    out += [fmt.delta(text) for text in texts if text]
    out += [fmt.finish(finish_reason), fmt.usage(usage), DONE]
    await resp.write(b"".join(out))
    return resp
