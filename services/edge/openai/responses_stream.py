"""The event pump's writers (``bus.pump.Writer``) for ``/v1/responses``: one JSON object, or typed SSE events.

Streamed, the answer is the event sequence OpenAI's SDK expects, each event with its
``sequence_number``: ``response.created``, ``response.in_progress``,
``response.output_item.added``, ``response.content_part.added``, one
``response.output_text.delta`` per delta, ``response.output_text.done``,
``response.content_part.done``, ``response.output_item.done``, then ``response.completed``
(``response.incomplete`` when ``max_output_tokens`` cut it). The stream opens with the first
output, so an error before it is a plain HTTP error; after it, an ``error`` event then
``response.failed``. ``on_finished`` (storing the response) runs before the last event goes out:
a client that saw ``response.completed`` can retrieve it at once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

from schemas.errors import BusError
from schemas.events import StreamError, TokenLogprob, Usage
from services.edge.http.sse import DirectSend, raise_error
from services.edge.middleware import SSE_RESPONSE
from services.edge.openai.bodies import SSE_HEADERS
from services.common.tool_format import CallStream, Piece, walk_pieces
from services.edge.openai.responses_body import ResponseDraft, item_json, output_text, sse_event

Finished = Callable[[ResponseDraft, dict[str, Any]], Awaitable[None]]

_encode = msgspec.json.Encoder().encode


class ResponseJsonWriter:
    """The whole answer as one ``response`` object, in ``response`` (and ``body``) once the pump ended."""

    def __init__(self, draft: ResponseDraft) -> None:
        self.draft = draft
        self.body: dict[str, Any] | None = None
        self.response: web.Response | None = None

    async def open(self) -> None:
        """Nothing goes out before the end."""

    def delta(self, index: int, text: str, logprobs: list[TokenLogprob]) -> None:
        """Keep the text."""
        self.draft.parts.append(text)

    def end(self, index: int, finish_reason: str) -> None:
        """The answer is complete."""
        self.draft.finish_reason = finish_reason

    def done(self, usage: Usage | None) -> None:
        """Build the object."""
        self.draft.usage = usage
        self.body = self.draft.response_json()
        self.response = web.Response(body=_encode(self.body), content_type="application/json")

    def error(self, error: StreamError | BusError) -> None:
        """Nothing was sent: the error is the HTTP answer."""
        raise_error(error)

    def flush(self) -> None:
        """Nothing goes out before the end (the handler returns ``response``)."""


class ResponseSseWriter:
    """The answer as the Responses API's typed SSE events."""

    def __init__(self, request: web.Request, draft: ResponseDraft, on_finished: Finished | None = None) -> None:
        self._request = request
        self.draft = draft
        self._on_finished = on_finished
        self._seq = 0
        self._out: list[bytes] = []
        self._final: dict[str, Any] | None = None  # the ended response object, until it went out
        self.response: web.StreamResponse | None = None
        self._direct: DirectSend | None = None
        where = {"item_id": draft.message_id, "output_index": 0, "content_index": 0}
        # A delta event is _prefix + JSON(text) + b',"sequence_number":' + seq + b'}\n\n' (encoded once).
        self._delta_prefix = (b"event: response.output_text.delta\ndata: " + _encode(
            {"type": "response.output_text.delta", **where, "logprobs": []})[:-1] + b',"delta":')
        self._where = where

    def _event(self, kind: str, **fields: Any) -> None:
        self._out.append(sse_event({"type": kind, **fields, "sequence_number": self._seq}))
        self._seq += 1

    async def _start(self) -> None:
        """Send the headers, ``response.created`` and ``response.in_progress``."""
        resp = web.StreamResponse(headers=SSE_HEADERS)
        self._request[SSE_RESPONSE] = resp
        await resp.prepare(self._request)
        self.response = resp
        self._direct = DirectSend(self._request, resp)
        shown = self.draft.response_json()
        self._event("response.created", response=shown)
        self._event("response.in_progress", response=shown)

    async def open(self) -> None:
        """Send the headers and the events that open the answer (the response, its message, its text part)."""
        await self._start()
        self._event("response.output_item.added", output_index=0, item=self.draft.message_json(final=False))
        self._event("response.content_part.added", **self._where, part=output_text(""))

    def delta(self, index: int, text: str, logprobs: list[TokenLogprob]) -> None:
        """One ``response.output_text.delta`` (none for an empty delta)."""
        if not text:
            return
        self.draft.parts.append(text)
        self._out.append(self._delta_prefix + _encode(text) + b',"sequence_number":' + str(self._seq).encode()
                         + b"}\n\n")
        self._seq += 1

    def end(self, index: int, finish_reason: str) -> None:
        """The text is complete: close the part and the message."""
        self.draft.finish_reason = finish_reason
        text = self.draft.text
        self._event("response.output_text.done", **self._where, text=text, logprobs=[])
        self._event("response.content_part.done", **self._where, part=output_text(text))
        self._event("response.output_item.done", output_index=0, item=self.draft.message_json(final=True))

    def done(self, usage: Usage | None) -> None:
        """The last event: ``response.completed`` (or ``response.incomplete``), sent after ``on_finished``."""
        self.draft.usage = usage
        self._final = self.draft.response_json()

    def error(self, error: StreamError | BusError) -> None:
        """Before the first byte an HTTP error answer; after it an ``error`` event, then ``response.failed``."""
        if self.response is None:
            raise_error(error)
        self.draft.error = error
        self._event("error", code=error.code, message=error.message, param=error.param)
        self._event("response.failed", response=self.draft.response_json())

    def flush(self) -> Awaitable[None] | None:
        """One write of what the events rendered to (``None`` if they rendered nothing)."""
        if self._final is not None:
            return self._finish()
        if not self._out:
            return None
        data = b"".join(self._out)
        self._out.clear()
        self._direct.sent = True
        return self.response.write(data)

    def write_now(self, text: str, logprobs: list[TokenLogprob]) -> bool:
        """Send the delta's events at once, synchronously; False (nothing sent or kept) if they cannot go now
        (``DirectSend``)."""
        return self._direct is not None and self._direct.write(self._out, self.delta, text, logprobs)

    async def _finish(self) -> None:
        final, self._final = self._final, None
        if self._on_finished is not None:
            await self._on_finished(self.draft, final)
        self._event(f"response.{final['status']}", response=final)
        data = b"".join(self._out)
        self._out.clear()
        await self.response.write(data)


class ToolResponseSseWriter(ResponseSseWriter):
    """The typed events of an answer that may call functions (the request offered ``tools``).

    The generated text is split as it arrives (``tool_format.CallStream``, the splitter chat's
    ``delta.tool_calls`` use): text outside calls streams as the assistant message's
    ``output_text`` deltas, opened at its first non-blank text; each call is an output item of its
    own, announced when its name is known (``response.output_item.added``, arguments ``""``), then
    ``response.function_call_arguments.delta`` fragments, and at the end
    ``response.function_call_arguments.done`` and ``response.output_item.done``. Output indexes
    follow the order items opened in, as the final ``output`` lists them.
    """

    def __init__(self, request: web.Request, draft: ResponseDraft, on_finished: Finished | None = None) -> None:
        super().__init__(request, draft, on_finished)
        self._calls = CallStream()
        self._message_index: int | None = None
        self._call_index: dict[int, int] = {}  # call number -> output index
        self._blank = ""  # leading whitespace held until the message opens (or is never needed)

    async def open(self) -> None:
        """Send the headers, ``response.created`` and ``response.in_progress``; items open as they come."""
        await self._start()

    def _next_index(self) -> int:
        return (self._message_index is not None) + len(self._call_index)

    def _open_message(self) -> None:
        self._message_index = self._next_index()
        self._where = {"item_id": self.draft.message_id, "output_index": self._message_index, "content_index": 0}
        self._event("response.output_item.added", output_index=self._message_index,
                    item=self.draft.message_json(final=False))
        self._event("response.content_part.added", **self._where, part=output_text(""))

    def _text(self, text: str) -> None:
        if self._message_index is None:
            if not text.strip():
                self._blank += text
                return
            self._open_message()
            text, self._blank = self._blank + text, ""
        self._event("response.output_text.delta", **self._where, delta=text, logprobs=[])

    def _call_start(self, i: int, name: str) -> None:
        index = self._call_index[i] = self._next_index()
        item_id, call_id = self.draft.call_ids(i)
        self._event("response.output_item.added", output_index=index,
                    item={"id": item_id, "type": "function_call", "status": "in_progress",
                          "call_id": call_id, "name": name, "arguments": ""})

    def _call_arguments(self, i: int, fragment: str) -> None:
        self._event("response.function_call_arguments.delta", item_id=self.draft.call_ids(i)[0],
                    output_index=self._call_index[i], delta=fragment)

    def _pieces(self, pieces: list[Piece]) -> None:
        walk_pieces(pieces, text=self._text, start=self._call_start, arguments=self._call_arguments)

    def delta(self, index: int, text: str, logprobs: list[TokenLogprob]) -> None:
        """The events ``text`` completes: message text, a call opening, or its arguments' next fragment."""
        if text:
            self.draft.parts.append(text)
            self._pieces(self._calls.feed(text))

    def end(self, index: int, finish_reason: str) -> None:
        """Close the message (opened now if the answer is only blank text) and every call."""
        self.draft.finish_reason = finish_reason
        self._pieces(self._calls.close())
        items = {item.id: item for item in self.draft.output_items()}
        if self._message_index is None and self.draft.message_id in items:
            self._open_message()
            if self._blank:
                self._event("response.output_text.delta", **self._where, delta=self._blank, logprobs=[])
        if self._message_index is not None:
            text = self.draft.text
            self._event("response.output_text.done", **self._where, text=text, logprobs=[])
            self._event("response.content_part.done", **self._where, part=output_text(text))
            self._event("response.output_item.done", output_index=self._message_index,
                        item=self.draft.message_json(final=True))
        for i, output_index in self._call_index.items():
            item = items[self.draft.call_ids(i)[0]]
            self._event("response.function_call_arguments.done", item_id=item.id, output_index=output_index,
                        arguments=item.arguments)
            self._event("response.output_item.done", output_index=output_index,
                        item=item_json(item, self.draft.item_status))
