"""The loop side of an engine whose model runs in its own thread (transformers, llama.cpp).

The model thread hands each decode step's events over in one loop wake-up; every request reads
its own queue. A request given a token writer (``EventQueues.write_through``) has its chunks
written by the model thread itself, as long as the writer takes them: each writer takes its chunk,
then each is flushed, so writers that share a connection send the whole step in one write. After a step that
finished sequences, it may hold the next step for a few milliseconds while their replacements
are on their way (``join_window``). A request's stream ends at its ``Finished`` (or a
``Failed``, raised as a typed error); a consumer that stops early aborts the sequence in the
model thread.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from schemas.errors import BusError, ErrorCode
from services.engine.backend import Chunk, ChunkWriter, Finished, GenerationEvent, JoinStats
from services.engine.backends.join_window import JoinWindow


@dataclass(slots=True)
class Failed:
    """A sequence could not be generated (a forward/decode failed, its adapter could not be loaded) or was
    aborted; delivered in place of further events. The MLX backend's worker thread uses it too."""

    code: str
    message: str


StepEvent = Chunk | Finished | Failed


class EventQueues:
    """Per-request queues fed from the model thread."""

    def __init__(self) -> None:
        self._queues: dict[str, asyncio.Queue[StepEvent]] = {}
        self._writers: dict[str, ChunkWriter] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop the model thread delivers to (set when the engine starts)."""
        self._loop = loop

    def write_through(self, request_id: str, writer: ChunkWriter | None) -> None:
        """From the loop: have ``request_id``'s chunks written by ``writer`` in the model thread; a chunk it
        returns False for, and the rest of the request, goes through the loop as usual. None: no writer."""
        if writer is None:
            self._writers.pop(request_id, None)
        else:
            self._writers[request_id] = writer

    def deliver(self, items: list[tuple[str, StepEvent]]) -> None:
        """Called in the model thread: hand the whole step's events to the loop in one wake-up (none when
        the requests' writers took them all)."""
        if self._writers:
            writers = self._writers
            took: list[ChunkWriter] = []
            rest: list[tuple[str, StepEvent]] = []
            for request_id, event in items:
                if type(event) is Chunk and (write := writers.get(request_id)) is not None and write(event):
                    took.append(write)
                else:
                    rest.append((request_id, event))
            for write in took:  # the first of a connection sends the step's frames on it; the others find none
                write.flush()
            if not rest:
                return
            items = rest
        self._loop.call_soon_threadsafe(self._dispatch, items)

    def _dispatch(self, items: list[tuple[str, StepEvent]]) -> None:
        for request_id, event in items:
            q = self._queues.get(request_id)
            if q is not None:
                q.put_nowait(event)

    def cancel(self, request_id: str) -> None:
        """End ``request_id``'s stream with ``cancelled`` (its sequence is aborted separately)."""
        q = self._queues.pop(request_id, None)
        if q is not None:
            q.put_nowait(Failed(ErrorCode.CANCELLED, "request aborted"))

    async def follow(self, request_id: str, submit: Callable[[], Awaitable[None]], abort: Callable[[str], None],
                     continued: int = 0) -> AsyncIterator[GenerationEvent]:
        """Register the request, ``submit`` it, and yield its events; ``abort`` it if the consumer stops early.

        ``continued`` prompt tokens were the answer so far of a migrated request: they are not
        counted as prompt (the producer adds them to the completion).
        """
        q: asyncio.Queue[StepEvent] = asyncio.Queue()
        self._queues[request_id] = q  # before submit (which may await a download): a cancel meanwhile is kept
        finished = False
        held: StepEvent | None = None
        try:
            await submit()
            while True:
                event, held = (held, None) if held is not None else (await q.get(), None)
                if isinstance(event, Chunk) and not q.empty():
                    event, held = coalesce(event, q)
                if isinstance(event, Failed):
                    finished = True
                    raise BusError(event.code, event.message)
                if isinstance(event, Finished):
                    finished = True
                    billed = event.prompt_tokens - continued
                    yield Finished(event.reason, billed, event.completion_tokens, min(event.cached_tokens, billed))
                    return
                yield event
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                abort(request_id)


def coalesce(chunk: Chunk, q: asyncio.Queue[StepEvent]) -> tuple[Chunk, StepEvent | None]:
    """``chunk`` merged with the chunks already queued behind it, and the first non-chunk event taken (or None).

    A consumer that fell behind the model thread (a loaded host, a slow reply path) then sends one
    delta for several tokens instead of one message per token through the engine, NATS and the
    edge; a consumer that keeps up never finds a second chunk waiting and still sends one per step.
    """
    texts, ids, logprobs = [chunk.text], list(chunk.token_ids), list(chunk.logprobs or ())
    while not q.empty():
        event = q.get_nowait()
        if not isinstance(event, Chunk):
            return Chunk("".join(texts), ids, logprobs or None), event
        texts.append(event.text)
        ids += event.token_ids
        logprobs += event.logprobs or ()
    return Chunk("".join(texts), ids, logprobs or None), None


class ModelThread(threading.Thread):
    """The inbox side of a model thread: sequences submitted and aborted from the loop, taken between steps.

    Subclasses run the steps (``run``); they read ``_waiting`` after ``_collect`` and drop what
    ``_take_aborted`` returns from their running batch.
    """

    def __init__(self, name: str, deliver: Callable[[list[tuple[str, StepEvent]]], None],
                 join_window: float = 0.0) -> None:
        super().__init__(name=name, daemon=True)
        self._deliver = deliver
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._aborted: set[str] = set()
        self._lock = threading.Lock()
        self._waiting: list = []
        self._stopping = False
        self._joins = JoinWindow(join_window)
        self.steps = 0

    # --- called from the event loop ---
    def submit(self, seq) -> None:
        """Queue ``seq`` for admission at the next step."""
        self._inbox.put(seq)

    def abort(self, request_id: str) -> None:
        """Drop ``request_id`` (and free what it holds) at the next step."""
        with self._lock:
            self._aborted.add(request_id)

    def stop(self) -> None:
        """Ask the thread to exit after the current step."""
        self._stopping = True
        self._inbox.put(None)

    def join_stats(self) -> JoinStats:
        """The join window's totals so far."""
        return self._joins.stats()

    # --- the model thread ---
    def _collect(self, block: bool) -> None:
        """Move submitted sequences to ``_waiting`` (waiting up to 0.5 s for one when ``block``)."""
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                self._take(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _take(self, item) -> bool:
        """Move one inbox item to ``_waiting``; False for the stop marker."""
        if item is None:
            return False
        self._waiting.append(item)
        return True

    def _hand_over(self, events: list[tuple[str, StepEvent]], running: int, step_seconds: float) -> None:
        """Deliver a step's ``events``; then, if it finished sequences while ``running`` others go on and no
        request waits, hold the next step until as many new requests came or the join window closed."""
        self._deliver(events)
        finished = sum(type(event) is Finished for _, event in events)
        if not finished:
            return
        if not running:
            self._joins.idle()
            return
        wait = self._joins.hold(step_seconds) if not self._waiting and not self._stopping else 0.0
        if wait <= 0:
            return
        now, joined = time.perf_counter(), 0
        try:
            while joined < finished and (left := now + wait - time.perf_counter()) > 0:
                if not self._take(self._inbox.get(timeout=left)):
                    break
                joined += 1
        except queue.Empty:
            pass
        self._joins.held(joined, time.perf_counter() - now)

    def _take_aborted(self) -> set[str]:
        """Request ids aborted since the last step, already removed from ``_waiting``."""
        with self._lock:
            if not self._aborted:
                return set()
            aborted, self._aborted = self._aborted, set()
        self._waiting = [s for s in self._waiting if s.request_id not in aborted]
        return aborted
