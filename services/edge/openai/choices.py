"""OpenAI ``n`` > 1: one answer merged from ``n`` ordinary requests, one per choice.

The edge fans a request out into ``n`` requests with ``n`` 1 each (``openai_translate.
choice_requests``: ids ``<id>-c<i>``, seeds ``seed + i``), published together. Each is an
``InferenceCall`` like any other, so queueing, the prompt cache, failover (re-dispatch before the
first token, migration mid-stream) and cancel work per choice unchanged. ``ChoiceCalls`` enters
the ``n`` calls as one context (leaving it cancels every choice that did not end: a client gone,
the deadline, an error in another choice) and merges their events, tagged with the choice index.

Non-streaming, the body holds every choice; usage counts the prompt once (OpenAI's convention)
plus every choice's completion tokens. Streaming, each chunk carries its choice's ``index``, each
choice gets its own finish chunk, and the usage chunk (``include_usage``) and ``[DONE]`` follow
the last one. An error in any choice before the first SSE byte is the usual HTTP error answer;
after it, an error event then ``[DONE]``, and the other choices are cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from schemas.errors import BusError
from schemas.events import StreamEnd, StreamError, StreamEvent, StreamStart, TokenDelta, TokenLogprob, Usage
from schemas.inference import InferenceRequest
from services.common.lifecycle import cancel_and_wait
from services.edge.bus.publish import InferenceCall, RequestPublisher
from services.edge.middleware import SSE_RESPONSE
from services.edge.openai.bodies import DONE, SSE_HEADERS, ChoiceResult, ChunkFormatter
from services.edge.http.sse import BodyBuilder, error_event, raise_error, render_delta

# What a choice's pump hands the merger: (choice index, its next event or the error that ended it).
Item = tuple[int, StreamEvent | BusError]


class ChoiceCalls:
    """The ``n`` in-flight requests of one answer: ``async with ChoiceCalls(...) as calls: calls.next_item()``."""

    def __init__(self, publisher: RequestPublisher, requests: list[InferenceRequest], timeout: float) -> None:
        self._publisher = publisher
        self._requests = requests
        self._timeout = timeout
        self.calls: list[InferenceCall] = []
        self._stack = contextlib.AsyncExitStack()
        self._merged: asyncio.Queue[Item] = asyncio.Queue()
        self._pumps: list[asyncio.Task] = []

    async def __aenter__(self) -> ChoiceCalls:
        async with contextlib.AsyncExitStack() as stack:
            # One publication after the other: if one is refused (a full queue), the ones already out are cancelled.
            for req in self._requests:
                self.calls.append(await stack.enter_async_context(self._publisher.call(req, self._timeout)))
            self._stack = stack.pop_all()
        self._pumps = [asyncio.create_task(self._pump(i, call)) for i, call in enumerate(self.calls)]
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        await cancel_and_wait(*self._pumps)
        # Each call cancels its request on the bus unless it ended there (client gone, deadline, another's error).
        await self._stack.__aexit__(exc_type, exc, tb)

    async def _pump(self, index: int, call: InferenceCall) -> None:
        """Move one choice's events (failover included, see ``InferenceCall``) to the merged queue."""
        while True:
            try:
                event = await call.next_event()
            except BusError as err:  # its deadline passed
                self._merged.put_nowait((index, err))
                return
            self._merged.put_nowait((index, event))
            if type(event) in (StreamEnd, StreamError):
                return

    async def next_item(self) -> Item:
        """The next event of any choice, with its index."""
        return await self._merged.get()

    def next_nowait(self) -> Item | None:
        """The next event if one has already arrived, else ``None``."""
        return self._merged.get_nowait() if self._merged.qsize() else None

    @property
    def usage(self) -> Usage | None:
        """The prompt once plus every ended choice's completion tokens (None before any ended)."""
        ended = [call.usage for call in self.calls if call.usage is not None]
        if not ended:
            return None
        return Usage(prompt_tokens=ended[0].prompt_tokens, completion_tokens=sum(u.completion_tokens for u in ended),
                     cached_tokens=ended[0].cached_tokens)


def _raise(item: StreamEvent | BusError) -> None:
    if isinstance(item, BusError):
        raise item
    if type(item) is StreamError:
        raise_error(item)


async def collect(calls: ChoiceCalls, build: BodyBuilder, *, request_id: str, created: int, model: str,
                  logprobs: bool) -> web.Response:
    """Wait for every choice and return one JSON body with all of them (``index`` = choice number)."""
    n = len(calls.calls)
    parts: list[list[str]] = [[] for _ in range(n)]
    entries: list[list[TokenLogprob]] = [[] for _ in range(n)]
    results: list[ChoiceResult | None] = [None] * n
    left = n
    while left:
        index, event = await calls.next_item()
        _raise(event)
        match event:
            case TokenDelta(text=text, logprobs=tokens):
                parts[index].append(text)
                entries[index].extend(tokens)
            case StreamEnd(finish_reason=finish_reason):
                results[index] = ChoiceResult("".join(parts[index]), finish_reason,
                                              entries[index] if logprobs else None)
                left -= 1
    body = build(request_id=request_id, created=created, model=model, choices=results, usage=calls.usage)
    return web.Response(body=body, content_type="application/json")


async def _first_output(calls: ChoiceCalls) -> Item:
    """Skip ``StreamStart``s; the first item that produces output, raising an error of any choice."""
    while True:
        index, event = await calls.next_item()
        _raise(event)
        if type(event) is not StreamStart:
            return index, event


def _render(item: Item, fmts: list[ChunkFormatter], out: list[bytes]) -> str | None:
    """Append the SSE bytes of one choice's event; ``"end"`` when that choice ended, ``"error"`` for an error."""
    index, event = item
    match event:
        case TokenDelta():
            render_delta(event, fmts[index], out)
        case StreamEnd(finish_reason=finish_reason):
            out.append(fmts[index].finish(finish_reason))
            return "end"
        case StreamError() | BusError():
            out.append(error_event(event))
            return "error"
    return None  # StreamStart (a re-dispatch of that choice): nothing to send


async def stream(request: web.Request, calls: ChoiceCalls, fmts: list[ChunkFormatter]) -> web.StreamResponse:
    """Stream every choice as OpenAI SSE chunks tagged with their index, then usage and ``[DONE]``."""
    item = await _first_output(calls)
    resp = web.StreamResponse(headers=SSE_HEADERS)
    request[SSE_RESPONSE] = resp
    await resp.prepare(request)
    out = [b"".join(fmt.start() for fmt in fmts)]
    left = len(fmts)
    while True:
        while item is not None:
            outcome = _render(item, fmts, out)
            if outcome == "error":
                await resp.write(b"".join(out))
                return resp  # leaving ChoiceCalls cancels the other choices
            if outcome == "end":
                left -= 1
                if not left:
                    out.append(fmts[0].usage(calls.usage))
                    out.append(DONE)
                    await resp.write(b"".join(out))
                    return resp
            item = calls.next_nowait()  # events already queued share one write
        if out:
            await resp.write(b"".join(out))
            out = []
        item = await calls.next_item()
