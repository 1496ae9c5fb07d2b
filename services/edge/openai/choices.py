"""OpenAI ``n`` > 1: one answer merged from ``n`` ordinary requests, one per choice.

The edge fans a request out into ``n`` requests with ``n`` 1 each (``openai_translate.
choice_requests``: ids ``<id>-c<i>``, seeds ``seed + i``), published together. Each is an
``InferenceCall`` like any other, so queueing, the prompt cache, failover (re-dispatch before the
first token, migration mid-stream) and cancel work per choice unchanged. ``ChoiceCalls`` enters
the ``n`` calls as one context (leaving it cancels every choice that did not end: a client gone,
the deadline, an error in another choice) and merges their events into one ``pump.Source``: the
edge's event pump hands each to the answer's writer with its choice index.

Non-streaming, the body holds every choice; usage counts the prompt once (OpenAI's convention)
plus every choice's completion tokens. Streaming, each chunk carries its choice's ``index``, each
choice gets its own finish chunk, and the usage chunk (``include_usage``) and ``[DONE]`` follow
the last one. An error in any choice before the first SSE byte is the usual HTTP error answer;
after it, an error event then ``[DONE]``, and the other choices are cancelled. The merged events
waiting for the client are bounded like one request's (``bus.replies``): past the edge's
``--max-stream-buffer`` the client is not reading, and every choice is cut as a slow consumer.
"""

from __future__ import annotations

import asyncio
import contextlib

from schemas.errors import BusError
from schemas.events import StreamEnd, StreamError, StreamEvent, Usage
from schemas.inference import InferenceRequest
from services.common.lifecycle import cancel_and_wait
from services.edge.bus.publish import InferenceCall, RequestPublisher

# What a choice's task hands the merger: (choice index, its next event).
Item = tuple[int, StreamEvent]


class ChoiceCalls:
    """The ``n`` in-flight requests of one answer: ``async with ChoiceCalls(...) as calls: await pump(calls, ...)``."""

    def __init__(self, publisher: RequestPublisher, requests: list[InferenceRequest], timeout: float) -> None:
        self._publisher = publisher
        self._requests = requests
        self.width = len(requests)
        self.index = 0  # the choice of the event last returned
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
            except BusError as err:  # its deadline passed: the error ends the answer like an engine's
                self._merged.put_nowait((index, StreamError(id=call.request.id, code=err.code, message=err.message,
                                                            param=err.param)))
                return
            self._merged.put_nowait((index, event))
            if self._merged.qsize() > self._publisher.router.max_buffer:  # the client is not reading the answer
                for each in self.calls:
                    each.cut_slow_consumer(f"more than {self._publisher.router.max_buffer} events were waiting for it")
            if type(event) in (StreamEnd, StreamError):
                return

    async def next_event(self) -> StreamEvent:
        """The next event of any choice (its choice in ``index``)."""
        self.index, event = await self._merged.get()
        return event

    def next_nowait(self) -> StreamEvent | None:
        """The next event if one has already arrived, else ``None``."""
        if not self._merged.qsize():
            return None
        self.index, event = self._merged.get_nowait()
        return event

    @property
    def usage(self) -> Usage | None:
        """The prompt once plus every ended choice's completion tokens (None before any ended)."""
        ended = [call.usage for call in self.calls if call.usage is not None]
        if not ended:
            return None
        return Usage(prompt_tokens=ended[0].prompt_tokens, completion_tokens=sum(u.completion_tokens for u in ended),
                     cached_tokens=ended[0].cached_tokens)
