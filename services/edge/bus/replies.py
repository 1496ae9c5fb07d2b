"""The edge's one reply inbox: every token event for every request arrives on one wildcard.

A request registers a queue under its id before it is published; events on
``<inbox root>.<edge>.<request id>`` (root ``_INBOX.edge``: the edge user's inbox) are decoded once and put on that queue. The router also
remembers which engine (from ``StreamStart``) runs each request, so requests on an engine that
stopped heart-beating get a local ``worker_lost`` event instead of waiting for their deadline
(``InferenceCall`` then fails them over to another engine, see ``failover``). Engines send
``StreamStart`` before answering the scheduler "accepted", so an engine that dies between its
accept and its first token is covered too.

Events travel on core NATS, so the ones sent while the edge moves to another NATS node (its
node was lost) are gone. An engine numbers a request's events (``seq`` 1, 2, ... from its
``StreamStart``): a gap, or the connection coming back at all, marks every request that may have
lost events as ``gap`` and ends it locally with ``engine_failed``, which ``InferenceCall`` turns
into a continuation of exactly what the client has (see ``failover``).

Each event carries the scheduler's offer number (``dispatch``); the router follows the newest
offer it has seen. An engine that accepted an older offer late (after the scheduler had
stopped waiting for it and offered the request to another engine) has its events dropped and is
told to stop that offer, so two engines never stream into one answer. Per event this costs one
integer comparison; only a mismatch takes the slow path.

A client that stops reading its stream stops the event pump (its write waits for the socket to
drain) while the engine keeps publishing: the request's queue would grow without bound. Past
``max_buffer`` queued events (one more integer comparison per event), or once the client's
connection has refused writes for ``write_timeout`` seconds (checked by the liveness sweep), the
request is cut as a slow consumer: its queued events are dropped, it ends with a
``slow_consumer`` error (owing the bus a cancel, which ``InferenceCall`` sends), and a connection
that cannot take even that error is closed. The router itself never waits on a request's queue,
so one stalled client slows no other stream.

A request whose answer is written while the router routes (``PendingReply.sink``, set by
``InferenceCall.write_through``) has each token delta handed to it at once, as long as nothing
waits in its queue: one stream's token then costs the edge one socket read and one socket write,
with no task woken in between. The sink takes a delta only when its writer can send it right now;
anything else (every other event, a delta while the handler is busy or the client's socket is
full) is queued as above, and everything after it too until the handler has caught up, so the
client gets the events in the order they came. A sink that raises is dropped, and the event and
the rest of its request are queued: the handler meets the fault, in that request alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol, TypeAlias

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas import names
from schemas.errors import ErrorCode
from schemas.events import StreamError, StreamEvent, StreamStart, decode_event, encode
from schemas.inference import CancelRequest
from services.common.bus import BUS_DOWN

log = logging.getLogger(__name__)


# How a request is ended when its client stops reading (the ``abandon_reason`` its bus cancel carries).
SLOW_CONSUMER = "slow_consumer"


# Takes one event of its request at once (True), or leaves it to the request's queue (False).
Sink: TypeAlias = Callable[[StreamEvent], bool]


class ClientConnection(Protocol):
    """The client's connection an answer is written to (aiohttp's ``request.protocol``)."""

    @property
    def writing_paused(self) -> bool:
        """The socket's send buffer is full: the client is not reading (a write is waiting for it)."""

    @property
    def transport(self) -> asyncio.Transport | None:
        """The socket (``None`` once closed)."""


class PendingReply:
    """The reply side of one in-flight request."""

    __slots__ = ("abandon_reason", "client", "dead_since", "dispatch", "gap", "lost", "next_seq", "queue",
                 "sink", "stalled_since", "worker")

    def __init__(self) -> None:
        self.queue: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self.worker: str | None = None
        self.dead_since: float | None = None
        # Set when the edge ended the request itself; the engine may still be running it.
        self.abandon_reason: str | None = None
        # The engine that stopped heart-beating while running the request (failover avoids it).
        self.lost: str | None = None
        # The newest offer of the request seen (``InferenceRequest.dispatch``): its engine is the one followed.
        self.dispatch = 0
        # The ``seq`` the followed engine's next event must have; ``gap``: some may have been lost.
        self.next_seq = 1
        self.gap = False
        # The connection the answer goes to (set once a writer is chosen), and since when it refuses writes.
        self.client: ClientConnection | None = None
        self.stalled_since: float | None = None
        # Offered each event before it is queued, while the queue is empty (see the module docstring).
        self.sink: Sink | None = None

    def restart(self) -> None:
        """Forget the lost attempt: its queued events and its engine (a new attempt is about to start)."""
        while self.queue.qsize():
            self.queue.get_nowait()
        self.worker = self.dead_since = self.abandon_reason = None
        self.dispatch = 0  # the new attempt is a new request id: the scheduler numbers its offers from 0
        self.next_seq, self.gap = 1, False

    def lost_events(self, request_id: str, why: str) -> None:
        """Some of the request's events may be lost: end this attempt so the call continues it elsewhere.

        The engine itself is fine (it is not avoided); later events of this attempt are dropped.
        """
        if self.gap:
            return
        self.gap = True
        self.queue.put_nowait(StreamError(id=request_id, code=ErrorCode.ENGINE_FAILED,
                                          message=f"events of this request were lost on the bus ({why})"))

    def fail(self, request_id: str, code: ErrorCode, message: str, reason: str) -> None:
        """End the request locally with a typed error (it still owes the bus a cancel)."""
        self.abandon_reason = reason
        self.worker = None
        self.queue.put_nowait(StreamError(id=request_id, code=code, message=message))

    def cut(self, request_id: str, why: str) -> None:
        """End the request because its client does not read: free its events, drop later ones, close if stuck.

        The error still reaches a client whose connection can take it (an SSE error event, then
        ``[DONE]``); a connection whose writes are blocked is closed, which ends the stalled write.
        """
        while self.queue.qsize():
            self.queue.get_nowait()
        self.gap = True  # later events of the request are dropped on arrival
        self.fail(request_id, ErrorCode.SLOW_CONSUMER, f"the client did not read its stream: {why}", SLOW_CONSUMER)
        client = self.client
        if client is not None and client.writing_paused and (transport := client.transport) is not None:
            transport.abort()


class ReplyRouter:
    """Routes events from the edge's wildcard inbox to per-request queues."""

    def __init__(self, edge_id: str, root: str = names.REPLY_PREFIX, *, max_buffer: int = 4096,
                 on_slow_consumer: Callable[[], None] | None = None, write_through: bool = True) -> None:
        self.edge_id = names.token(edge_id)
        self.max_buffer = max_buffer  # events one request may have waiting for its client
        self._on_slow_consumer = on_slow_consumer
        self.root = root  # the edge's inbox root: its NATS user may subscribe under it only
        self._pending: dict[str, PendingReply] = {}
        self._sub: Subscription | None = None
        self._nc: Client | None = None
        self.unrouted = 0
        self.write_through = write_through  # requests may set a sink (off: --no-write-through)
        self.written_through = 0  # events a request's sink took (written to its client on arrival)
        self.strays = 0  # events dropped because they came from an older offer than the one followed
        self._withdrawals: set[asyncio.Task[None]] = set()  # withdrawals being sent

    def __len__(self) -> int:
        return len(self._pending)

    async def start(self, nc: Client) -> None:
        """Subscribe to ``<root>.<edge>.*`` (once, for every request this edge will make)."""
        self._nc = nc
        self._sub = await nc.subscribe(names.reply_inbox_all(self.edge_id, self.root), cb=self._on_msg)

    async def stop(self) -> None:
        """Unsubscribe; requests still registered get an error instead of waiting forever."""
        if self._sub is not None:
            with contextlib.suppress(nats.errors.ConnectionClosedError):  # nothing to unsubscribe from
                await self._sub.unsubscribe()
            self._sub = None
        for rid, pending in list(self._pending.items()):
            pending.fail(rid, ErrorCode.INTERNAL, "the edge is shutting down", "edge_shutdown")

    def reply_to(self, request_id: str) -> str:
        """The reply subject of a request of this edge."""
        return names.reply_inbox(self.edge_id, request_id, self.root)

    def register(self, request_id: str) -> PendingReply:
        """Start routing events for ``request_id`` (call before publishing the request)."""
        pending = PendingReply()
        self._pending[request_id] = pending
        return pending

    def rebind(self, old_id: str, new_id: str) -> PendingReply:
        """Route ``new_id``'s events (a failover attempt) to ``old_id``'s queue; ``old_id``'s are dropped."""
        pending = self._pending.pop(old_id)
        self._pending[new_id] = pending
        return pending

    def unregister(self, request_id: str) -> None:
        """Stop routing events for ``request_id``; late events are dropped."""
        self._pending.pop(request_id, None)

    async def _on_msg(self, msg: Msg) -> None:
        self.route(msg.subject[msg.subject.rfind(".") + 1:], msg.data)

    def route(self, request_id: str, data: bytes) -> None:
        """One event of ``request_id`` as published (from the NATS inbox or the reply socket)."""
        pending = self._pending.get(request_id)
        if pending is None:
            # A late event after the request ended (cancelled, timed out): expected, not logged per event.
            self.unrouted += 1
            return
        try:
            event = decode_event(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            log.warning("malformed event for request %s: %s", request_id, exc)
            pending.fail(request_id, ErrorCode.INTERNAL, f"malformed event from the engine: {exc}", "bad_event")
            return
        if pending.gap:
            return  # the call is continuing the request as a new attempt
        if event.dispatch != pending.dispatch or type(event) is StreamStart:
            if not self._follows(request_id, pending, event):
                return
            if type(event) is StreamStart:
                pending.next_seq = 1
                pending.queue.put_nowait(event)
                return
        if pending.worker is not None and event.seq:  # an engine's numbered event (StreamStart has none)
            if event.seq != pending.next_seq:
                log.warning("request %s: event %d arrived, %d expected: continuing it as a new attempt",
                            request_id, event.seq, pending.next_seq)
                pending.lost_events(request_id, f"event {pending.next_seq} never arrived")
                return
            pending.next_seq += 1
        if pending.queue.qsize() >= self.max_buffer:  # its client is not reading
            self._cut(request_id, pending, f"more than {self.max_buffer} events were waiting for it")
            return
        if (sink := pending.sink) is not None and not pending.queue.qsize():
            try:
                taken = sink(event)
            except Exception:  # never into the callback that routes every other request's events
                log.exception("request %s: writing an event on arrival failed; the rest goes through its handler",
                              request_id)
                pending.sink, taken = None, False
            if taken:
                self.written_through += 1
                return
        pending.queue.put_nowait(event)

    def cut(self, request_id: str, why: str) -> None:
        """Cut ``request_id`` as a slow consumer (once; not one that already ended otherwise)."""
        pending = self._pending.get(request_id)
        if pending is not None and pending.abandon_reason is None:
            self._cut(request_id, pending, why)

    def _cut(self, request_id: str, pending: PendingReply, why: str) -> None:
        log.warning("request %s cut as a slow consumer: %s", request_id, why)
        pending.cut(request_id, why)
        if self._on_slow_consumer is not None:
            self._on_slow_consumer()

    def sweep_stalled(self, now: float, write_timeout: float) -> list[str]:
        """Cut requests whose client connection has refused writes for ``write_timeout`` seconds; return their ids."""
        cut = []
        for request_id, pending in self._pending.items():
            client = pending.client
            if client is None or pending.abandon_reason is not None:
                continue
            if not client.writing_paused:
                pending.stalled_since = None
            elif pending.stalled_since is None:
                pending.stalled_since = now
            elif now - pending.stalled_since >= write_timeout:
                self._cut(request_id, pending, f"a write to it did not complete within {write_timeout:g}s")
                cut.append(request_id)
        return cut

    def connection_restored(self) -> None:
        """The edge reconnected to NATS: events sent meanwhile are lost; every request under way continues anew."""
        for request_id, pending in self._pending.items():
            if pending.abandon_reason is None:
                pending.lost_events(request_id, "the edge's NATS connection was re-established")
        if self._pending:
            log.warning("reconnected to NATS: %d requests under way continue as new attempts", len(self._pending))

    def _follows(self, request_id: str, pending: PendingReply, event: StreamEvent) -> bool:
        """Whether ``event`` belongs to the newest offer of the request (noting a ``StreamStart``'s engine).

        An older offer's events come from an engine that accepted after the scheduler gave up on it:
        dropped, and that engine told to stop the offer. A newer offer's ``StreamStart`` replaces the
        engine followed, and the engine of the older offer is told to stop it (the call itself fails over
        if that engine had already streamed tokens, see ``InferenceCall``).
        """
        if event.dispatch < pending.dispatch:
            self.strays += 1
            if type(event) is StreamStart:
                log.warning("engine %s started offer %d of %s after offer %d: stopping it", event.worker,
                            event.dispatch, request_id, pending.dispatch)
                self._withdraw(event.worker, request_id, event.dispatch)
            return False
        if type(event) is StreamStart:
            if event.dispatch > pending.dispatch and pending.worker is not None:
                log.warning("offer %d of %s started on %s after offer %d on %s: following the newer", event.dispatch,
                            request_id, event.worker, pending.dispatch, pending.worker)
                self._withdraw(pending.worker, request_id, pending.dispatch)
            pending.worker = event.worker
            pending.dead_since = None
        pending.dispatch = event.dispatch
        return True

    def _withdraw(self, worker: str, request_id: str, dispatch: int) -> None:
        """Tell ``worker`` to stop offer ``dispatch`` of ``request_id``, in the background (events are routed
        without waiting on the bus)."""
        if self._nc is None:
            return
        task = asyncio.get_running_loop().create_task(self._send_withdrawal(worker, request_id, dispatch))
        self._withdrawals.add(task)
        task.add_done_callback(self._withdrawals.discard)

    async def _send_withdrawal(self, worker: str, request_id: str, dispatch: int) -> None:
        """Best effort: the withdrawn offer's events are dropped anyway."""
        assert self._nc is not None
        try:
            await self._nc.publish(names.engine_cancel(worker), encode(CancelRequest(
                id=request_id, reason="stray_dispatch", dispatch=dispatch)))
        except BUS_DOWN as exc:
            log.warning("could not stop offer %d of %s on %s: %s", dispatch, request_id, worker, type(exc).__name__)

    def sweep_lost_workers(self, is_alive: Callable[[str], bool], now: float, grace: float) -> list[str]:
        """End requests whose engine has not been alive for ``grace`` seconds; return their ids.

        The grace lets a scheduler that re-dispatches a request to another engine (a new
        ``StreamStart``) win against this edge giving up on it.
        """
        failed = []
        for request_id, pending in self._pending.items():
            worker = pending.worker
            if worker is None:
                continue
            if is_alive(worker):
                pending.dead_since = None
                continue
            if pending.dead_since is None:
                pending.dead_since = now
            if now - pending.dead_since >= grace:
                pending.lost = worker
                pending.fail(request_id, ErrorCode.WORKER_LOST,
                             f"engine {worker} stopped heart-beating while running this request", "worker_lost")
                failed.append(request_id)
        return failed
