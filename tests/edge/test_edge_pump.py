"""The edge's event pump on its own: what each writer is handed, and when, for scripted event streams.

The sources here are scripted lists of the events a reply stream carries (the pump's contract is
pure: no bus, no HTTP); the tests through real NATS are in test_edge_http, test_edge_choices,
test_edge_websocket and test_edge_failover.
"""

from __future__ import annotations

import pytest

from schemas.errors import BusError, ErrorCode
from schemas.events import StreamEnd, StreamError, StreamStart, TokenDelta, Usage
from services.edge.bus.pump import StoredAnswer, pump

USAGE = Usage(prompt_tokens=3, completion_tokens=2)


class Scripted:
    """A source: ``batches`` of (choice, event) that arrive together; the end of the script is the deadline."""

    def __init__(self, batches: list[list[tuple[int, object]]], width: int = 1) -> None:
        self._batches = [list(batch) for batch in batches]
        self.width = width
        self.index = 0
        self.usage = USAGE

    async def next_event(self):
        while self._batches and not self._batches[0]:
            self._batches.pop(0)  # the previous batch was read: the next one arrives
        if not self._batches:
            raise BusError(ErrorCode.TIMEOUT, "the request did not finish within its timeout")
        return self._take()

    def next_nowait(self):
        return self._take() if self._batches and self._batches[0] else None

    def _take(self):
        self.index, event = self._batches[0].pop(0)
        return event


class Recorder:
    """A writer that records every call; ``raises`` makes ``error`` before ``open`` raise, as HTTP writers do."""

    def __init__(self, raises: bool = True) -> None:
        self.calls: list[tuple] = []
        self._buffered: list[tuple] = []
        self._opened = False
        self._raises = raises

    async def open(self) -> None:
        self._opened = True
        self.calls.append(("open",))

    def delta(self, index, text, logprobs) -> None:
        self._buffered.append(("delta", index, text))

    def end(self, index, finish_reason) -> None:
        self._buffered.append(("end", index, finish_reason))

    def done(self, usage) -> None:
        self._buffered.append(("done", usage))

    def error(self, error) -> None:
        if self._raises and not self._opened:
            raise BusError(error.code, error.message)
        self._buffered.append(("error", error.code))

    def flush(self):
        if not self._buffered:
            return None
        batch, self._buffered = self._buffered, []
        return self._write(batch)

    async def _write(self, batch) -> None:
        self.calls.append(("flush", batch))


def delta(text: str, seq: int = 1) -> TokenDelta:
    return TokenDelta(id="r", seq=seq, text=text)


def end(finish_reason: str = "stop") -> StreamEnd:
    return StreamEnd(id="r", seq=9, finish_reason=finish_reason, usage=USAGE)


async def test_output_opens_the_answer_and_events_that_arrived_together_share_one_flush():
    start = StreamStart(id="r", worker="w", model="m")
    source = Scripted([[(0, start)], [(0, delta("a")), (0, delta("b"))], [(0, start)], [(0, delta("c")), (0, end())]])
    writer = Recorder()
    await pump(source, writer)
    assert writer.calls == [
        ("open",),
        ("flush", [("delta", 0, "a"), ("delta", 0, "b")]),
        ("flush", [("delta", 0, "c"), ("end", 0, "stop"), ("done", USAGE)]),
    ]


async def test_n_choices_end_when_the_last_one_does_with_the_sources_usage():
    source = Scripted([[(1, delta("x")), (0, delta("y")), (1, end("length"))], [(0, end())]], width=2)
    writer = Recorder()
    await pump(source, writer)
    assert writer.calls == [
        ("open",),
        ("flush", [("delta", 1, "x"), ("delta", 0, "y"), ("end", 1, "length")]),
        ("flush", [("end", 0, "stop"), ("done", USAGE)]),
    ]


async def test_an_error_before_any_output_is_raised_without_opening():
    source = Scripted([[(0, StreamStart(id="r", worker="w", model="m"))],
                       [(0, StreamError(id="r", code=ErrorCode.CONTEXT_LENGTH_EXCEEDED, message="too long"))]])
    writer = Recorder()
    with pytest.raises(BusError) as caught:
        await pump(source, writer)
    assert caught.value.code == ErrorCode.CONTEXT_LENGTH_EXCEEDED and writer.calls == []


@pytest.mark.parametrize("ending", ["engine error", "deadline"])
async def test_an_error_after_output_is_rendered_after_what_was_sent_and_ends_the_answer(ending):
    batches = [[(0, delta("a"))]]
    if ending == "engine error":
        batches.append([(0, delta("b")), (0, StreamError(id="r", code=ErrorCode.WORKER_LOST, message="gone")),
                        (0, delta("never"))])
    writer = Recorder()
    await pump(Scripted(batches), writer)
    code = ErrorCode.WORKER_LOST if ending == "engine error" else ErrorCode.TIMEOUT
    tail = [("delta", 0, "b"), ("error", code)] if ending == "engine error" else [("error", code)]
    assert writer.calls == [("open",), ("flush", [("delta", 0, "a")]), ("flush", tail)]


async def test_a_stored_answer_is_handed_over_as_its_replayed_events_in_one_flush():
    writer = Recorder()
    await pump(StoredAnswer(["a", "", "b"], "length", USAGE), writer)
    assert writer.calls == [("open",), ("flush", [("delta", 0, "a"), ("delta", 0, ""), ("delta", 0, "b"),
                                                  ("end", 0, "length"), ("done", USAGE)])]
