"""The edge's one event pump: every answer, whatever its wire format, is read from its events here.

``pump(source, writer)`` reads the events of one answer until it ended and hands each to a
``Writer``, one per wire format (a JSON body, OpenAI or native SSE, WebSocket frames). A
``Source`` is an in-flight request (``InferenceCall``, which fails over to another engine
itself), its ``n`` choices merged (``ChoiceCalls``), or an answer the edge already has
(``StoredAnswer``: a prompt-cache hit, an ``Idempotency-Key`` record). The pump stops at the
answer's end, at its first error, or at its deadline (``BusError(timeout)`` from the source); a
cancel (client gone, WebSocket cancel frame) cancels the task running it.

A writer opens its answer with the first output (not a ``StreamStart``), so an error before it
can still be a plain HTTP error (the writer raises it); after it, the writer renders the error
in its own format. Events that already arrived are handed over together and sent with one
``flush``; per token the pump costs one type check and one writer call.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from schemas.errors import BusError
from schemas.events import StreamEnd, StreamError, StreamEvent, StreamStart, TokenDelta, Usage


class Source(Protocol):
    """The events of one answer: ``width`` choices; ``index`` is the choice of the event last returned."""

    index: int
    width: int

    @property
    def usage(self) -> Usage | None:
        """The answer's usage once every choice ended (the prompt once, every choice's completion)."""

    async def next_event(self) -> StreamEvent:
        """The next event; raises ``BusError(timeout)`` at the answer's deadline."""

    def next_nowait(self) -> StreamEvent | None:
        """The next event if it already arrived, else ``None``."""


class Writer(Protocol):
    """One wire format: buffers what each event renders to, sends it on ``flush``."""

    async def open(self) -> None:
        """The answer has its first output: start it (an SSE response's headers and opening chunk)."""

    def delta(self, index: int, event: TokenDelta) -> None:
        """New text (and log-probabilities) of choice ``index``."""

    def end(self, index: int, event: StreamEnd) -> None:
        """Choice ``index`` ended."""

    def done(self, usage: Usage | None) -> None:
        """Every choice ended: close the answer."""

    def error(self, error: StreamError | BusError) -> None:
        """The answer ends with ``error``; raised as a ``BusError`` if the format can still say it otherwise."""

    async def flush(self) -> None:
        """Send what was buffered."""


async def pump(source: Source, writer: Writer) -> None:
    """Hand every event of ``source`` to ``writer`` until the answer ended (every choice, or an error)."""
    left = source.width
    opened = False
    while True:
        try:
            event = await source.next_event()
        except BusError as err:  # the deadline passed
            writer.error(err)
            break
        if not opened:
            if type(event) is StreamStart:
                continue
            if type(event) is not StreamError:
                await writer.open()
                opened = True
        while event is not None:  # events already queued share one flush
            kind = type(event)
            if kind is TokenDelta:
                writer.delta(source.index, event)
            elif kind is StreamEnd:
                writer.end(source.index, event)
                left -= 1
                if not left:
                    writer.done(source.usage)
                    return await writer.flush()
            elif kind is StreamError:
                writer.error(event)
                return await writer.flush()
            # else a StreamStart (a re-dispatch to another engine): nothing to send
            event = source.next_nowait()
        await writer.flush()
    await writer.flush()


class StoredAnswer:
    """A finished answer the edge already has, read as the events a scheduler would replay for it.

    ``texts`` are its deltas (one joined delta for an answer that is not streamed, as a replayed
    prompt-cache hit gives); ``request_id`` is the id it is shown under.
    """

    index = 0
    width = 1

    def __init__(self, request_id: str, texts: list[str], finish_reason: str, usage: Usage) -> None:
        events: list[StreamEvent] = [TokenDelta(id=request_id, seq=seq, text=text)
                                     for seq, text in enumerate(texts, start=1)]
        events.append(StreamEnd(id=request_id, seq=len(texts) + 1, finish_reason=finish_reason, usage=usage))
        self._events: Iterator[StreamEvent] = iter(events)
        self.usage = usage

    async def next_event(self) -> StreamEvent:
        """The next stored event (all are there already; ``pump`` stops at the last)."""
        return next(self._events)

    def next_nowait(self) -> StreamEvent | None:
        """The next stored event, ``None`` after the last."""
        return next(self._events, None)
