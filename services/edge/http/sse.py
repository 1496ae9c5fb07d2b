"""The HTTP writers of the event pump (``bus.pump``): one JSON body, or an SSE stream.

``JsonWriter`` gathers every choice and builds one body at the end. ``SseWriter`` streams chunks
from one ``ChunkFormatter`` per choice: OpenAI chat and completion chunks (tagged with their
choice's index, with log-probabilities when asked for), or the native API's events
(``NativeChunkFormatter``). A stream's headers go out with its first output, so an error before
it (a full context, a timeout while queued) is still a proper HTTP status; after it, an error is
an SSE error event followed by ``[DONE]``.

``SseWriter.write_now`` (and the Responses API's) sends one delta's chunk straight to the
connection's transport through ``DirectSend``, for a delta handed over on arrival (``bus.pump``).
It only does so after the writer's first write went out (aiohttp sends the headers with it), with
nothing buffered, and while the client's socket takes writes; otherwise it declines and the
delta takes the pump's way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

from schemas.errors import BusError
from schemas.events import StreamError, TokenLogprob, Usage
from services.edge.errors import error_json
from services.edge.middleware import SSE_RESPONSE
from services.edge.openai.bodies import DONE, SSE_HEADERS, ChoiceResult, ChunkFormatter, sse

BodyBuilder = Callable[..., bytes]
DeltaRenderer = Callable[[int, str, list[TokenLogprob]], None]


class DirectSend:
    """Synchronous writes to an open SSE response's connection, framed as aiohttp frames the response's
    own writes (HTTP/1.1 chunks; none for HTTP/1.0)."""

    __slots__ = ("_chunked", "_request", "_response", "sent")

    def __init__(self, request: web.Request, response: web.StreamResponse) -> None:
        self._request = request
        self._response = response
        self._chunked = response.headers.get(hdrs.TRANSFER_ENCODING) == "chunked"
        self.sent = False  # the writer's first write went out, and aiohttp's headers with it

    def write(self, out: list[bytes], render: DeltaRenderer, text: str, logprobs: list[TokenLogprob]) -> bool:
        """Render choice 0's delta into the empty ``out`` and send it now; False (nothing rendered) if it
        cannot go now: before the first write, with something buffered, while the client's socket is full."""
        transport = self._request.transport
        if (out or not self.sent or transport is None or transport.is_closing()
                or self._request.protocol.writing_paused or self._response.compression):
            return False
        render(0, text, logprobs)
        if out:
            data = b"".join(out)
            out.clear()
            if data:  # a tool-call formatter may hold text back
                transport.write(b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data)
        return True


def raise_error(event: StreamError | BusError) -> None:
    """Raise ``event`` as the ``BusError`` it carries (before the first byte: an HTTP error answer)."""
    if type(event) is StreamError:
        raise BusError(event.code, event.message, param=event.param)
    raise event


def error_event(error: StreamError | BusError) -> bytes:
    """An error after the first SSE byte: the OpenAI error body as an SSE event, then ``[DONE]``."""
    if type(error) is StreamError:
        error = BusError(error.code, error.message, param=error.param)
    return sse(error_json(error)) + DONE


class JsonWriter:
    """The whole answer as one JSON body built by ``build``, in ``response`` once the pump ended.

    One choice is built from ``text``, ``finish_reason`` (and ``logprobs``: every token's entries,
    when the request asked for them); ``n`` choices from ``choices``, one ``ChoiceResult`` each.
    """

    def __init__(self, build: BodyBuilder, *, request_id: str, created: int, model: str, width: int,
                 logprobs: bool) -> None:
        self._build = build
        self._request_id = request_id
        self._created = created
        self._model = model
        self._parts: list[list[str]] = [[] for _ in range(width)]
        self._entries: list[list[TokenLogprob]] | None = [[] for _ in range(width)] if logprobs else None
        self._results: list[ChoiceResult | None] = [None] * width
        self.response: web.Response | None = None

    async def open(self) -> None:
        """Nothing goes out before the end."""

    def delta(self, index: int, text: str, logprobs: list[TokenLogprob]) -> None:
        """Keep the text (and log-probabilities) of choice ``index``."""
        self._parts[index].append(text)
        if logprobs and self._entries is not None:
            self._entries[index].extend(logprobs)

    def end(self, index: int, finish_reason: str) -> None:
        """Choice ``index`` is complete."""
        self._results[index] = ChoiceResult("".join(self._parts[index]), finish_reason,
                                            self._entries[index] if self._entries is not None else None)

    def done(self, usage: Usage | None) -> None:
        """Build the body."""
        if len(self._results) == 1:
            [result] = self._results
            extra = {"logprobs": result.logprobs} if result.logprobs is not None else {}
            body = self._build(request_id=self._request_id, created=self._created, model=self._model,
                               text=result.text, finish_reason=result.finish_reason, usage=usage, **extra)
        else:
            body = self._build(request_id=self._request_id, created=self._created, model=self._model,
                               choices=self._results, usage=usage)
        self.response = web.Response(body=body, content_type="application/json")

    def error(self, error: StreamError | BusError) -> None:
        """Nothing was sent: the error is the HTTP answer."""
        raise_error(error)

    def flush(self) -> None:
        """Nothing goes out before the end (the handler returns ``response``)."""


class SseWriter:
    """The answer as SSE chunks, from one formatter per choice, ending with usage and ``data: [DONE]``."""

    def __init__(self, request: web.Request, fmts: list[ChunkFormatter]) -> None:
        self._request = request
        self._fmts = fmts
        self._out: list[bytes] = []
        self.response: web.StreamResponse | None = None
        self._direct: DirectSend | None = None

    async def open(self) -> None:
        """Send the headers; the opening chunks (chat's role, one per choice) go with the first output."""
        resp = web.StreamResponse(headers=SSE_HEADERS)
        self._request[SSE_RESPONSE] = resp
        await resp.prepare(self._request)
        self.response = resp
        self._direct = DirectSend(self._request, resp)
        lead = b"".join([fmt.start() for fmt in self._fmts])
        if lead:
            self._out.append(lead)

    def delta(self, index: int, text: str, logprobs: list[TokenLogprob]) -> None:
        """The chunk of one delta (none for an empty one), with its log-probabilities if it has any."""
        if logprobs:
            self._out.append(self._fmts[index].delta_logprobs(text, logprobs))
        elif text:
            self._out.append(self._fmts[index].delta(text))

    def end(self, index: int, finish_reason: str) -> None:
        """Choice ``index``'s finish chunk."""
        self._out.append(self._fmts[index].finish(finish_reason))

    def done(self, usage: Usage | None) -> None:
        """The usage chunk (if asked for) and ``[DONE]``."""
        self._out.append(self._fmts[0].usage(usage))
        self._out.append(DONE)

    def error(self, error: StreamError | BusError) -> None:
        """Before the first byte an HTTP error answer; after it an error event, then ``[DONE]``."""
        if self.response is None:
            raise_error(error)
        self._out.append(error_event(error))

    def flush(self) -> Awaitable[None] | None:
        """One write of what the events rendered to (``None`` if they rendered nothing)."""
        if not self._out:
            return None
        data = b"".join(self._out)
        self._out.clear()
        self._direct.sent = True
        return self.response.write(data)

    def write_now(self, text: str, logprobs: list[TokenLogprob]) -> bool:
        """Send choice 0's delta at once, synchronously; False (nothing sent or kept) if it cannot go now."""
        return self._direct is not None and self._direct.write(self._out, self.delta, text, logprobs)
