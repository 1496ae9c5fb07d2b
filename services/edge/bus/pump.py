"""The edge's one event pump: every answer, whatever its wire format, is read from its events here.

``pump(source, writer)`` reads the events of one answer until it ended and hands each to a
``Writer``, one per wire format (a JSON body, OpenAI or native SSE, WebSocket frames). A
``Source`` is an in-flight request (``InferenceCall``, which fails over to another engine
itself) or its ``n`` choices merged (``ChoiceCalls``); the pump stops at the answer's end, at its
first error, or at its deadline (``BusError(timeout)`` from the source); a cancel (client gone,
WebSocket cancel frame) cancels the task running it. An answer the edge already has
(``StoredAnswer``: a prompt-cache hit, an ``Idempotency-Key`` record) goes to the same writers
as the events a scheduler's replay of it would bring.

A writer opens its answer with the first output (not a ``StreamStart``), so an error before it
can still be a plain HTTP error (the writer raises it); after it, the writer renders the error
in its own format. Events that already arrived are handed over together and sent with one
``flush``; per token the pump costs one type check and one writer call.

Once the answer is open, a writer that can send a delta synchronously (``write_now``: the SSE
writers of chat, completions, the native API and the Responses API) is handed to a source that can call it (``write_through``, a single ``InferenceCall``):
a token delta that arrives while the pump waits then goes to the client from the router's
callback, without waking the pump (see ``replies``).
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol

from schemas.errors import BusError
from schemas.events import StreamEnd, StreamError, StreamEvent, StreamStart, TokenDelta, TokenLogprob, Usage


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

    def delta(self, index: int, text: str, logprobs: list[TokenLogprob]) -> None:
        """New text (and the log-probabilities of its tokens, when asked for) of choice ``index``."""

    def end(self, index: int, finish_reason: str) -> None:
        """Choice ``index`` ended."""

    def done(self, usage: Usage | None) -> None:
        """Every choice ended: close the answer."""

    def error(self, error: StreamError | BusError) -> None:
        """The answer ends with ``error``; raised as a ``BusError`` if the format can still say it otherwise."""

    def flush(self) -> Awaitable[None] | None:
        """Send what was buffered: the write to await, or ``None`` when there is nothing to send.

        Not a coroutine itself, so a batch costs no more than the one write it needs.
        """

    # Optional: ``write_now(text, logprobs) -> bool`` sends choice 0's delta synchronously, or returns
    # False having sent and buffered nothing (``publish.DeltaWriter``).


async def pump(source: Source | StoredAnswer, writer: Writer) -> None:
    """Hand every event of ``source`` to ``writer`` until the answer ended (every choice, or an error)."""
    if type(source) is StoredAnswer:
        return await _replay(source, writer)
    left = source.width  # choices still running
    opened = False
    while left:
        try:
            event = await source.next_event()
        except BusError as err:  # the deadline passed
            writer.error(err)
            event, left = None, 0
        if not opened and event is not None:
            if type(event) is StreamStart:
                continue
            if type(event) is not StreamError:
                await writer.open()
                opened = True
                _write_through(source, writer)
        while event is not None:  # events already queued share one flush
            kind = type(event)
            if kind is TokenDelta:
                writer.delta(source.index, event.text, event.logprobs)
            elif kind is StreamEnd:
                writer.end(source.index, event.finish_reason)
                left -= 1
                if not left:
                    writer.done(source.usage)
                    break
            elif kind is StreamError:
                writer.error(event)
                left = 0
                break
            # else a StreamStart (a re-dispatch to another engine): nothing to send
            event = source.next_nowait()
        if (sending := writer.flush()) is not None:
            await sending


def _write_through(source: Source, writer: Writer) -> None:
    """Let ``source`` hand deltas to ``writer.write_now`` while the pump waits, where both can."""
    write_through = getattr(source, "write_through", None)
    write_now = getattr(writer, "write_now", None)
    if write_through is not None and write_now is not None:
        write_through(write_now)


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    """A finished answer the edge already has (a prompt-cache hit, an ``Idempotency-Key`` record).

    ``texts`` are its deltas (one joined delta for an answer that is not streamed, as a replayed
    prompt-cache hit gives). ``pump`` hands them to the writer as a scheduler's replay of the
    answer would arrive: the deltas, then the end, in one flush.
    """

    texts: list[str]
    finish_reason: str
    usage: Usage


async def _replay(answer: StoredAnswer, writer: Writer) -> None:
    """``pump`` for an answer that is all there: its texts straight to the writer, one flush."""
    await writer.open()
    delta = writer.delta
    for text in answer.texts:
        delta(0, text, _NO_LOGPROBS)
    writer.end(0, answer.finish_reason)
    writer.done(answer.usage)
    if (sending := writer.flush()) is not None:
        await sending


_NO_LOGPROBS: list[TokenLogprob] = []  # a stored answer has none (never read-modified by a writer)
