"""A bus-level stand-in for an engine, for scheduler tests and ``bench/scheduler_throughput.py`` only.

It speaks the engine's side of the scheduler's two channels and nothing else: heartbeats on
``llm.v1.workers.status.<worker>`` and accepted/busy answers on
``llm.v1.engine.<worker>.generate``. It generates nothing. The scheduler never imports it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas import names
from schemas.errors import ErrorCode
from schemas.events import encode
from schemas.heartbeat import EngineHeartbeat, ServedModel
from schemas.inference import DispatchReply, InferenceRequest
from services.common import bus
from services.common.lifecycle import cancel_and_wait

_request_decoder = msgspec.json.Decoder(InferenceRequest)


class EngineDouble:
    """An engine with ``slots`` slots serving ``models``, driven by the test.

    Accepted requests stay in flight until ``finish()`` (or for ``service_time`` seconds when
    set). ``busy=True`` makes it refuse every dispatch as busy, ``refusal`` (an error code)
    refuses it with that code; ``silent=True`` never answers (a hung engine: the dispatch times
    out); ``reply_delay`` delays answers; ``on_accept`` is called with each accepted request;
    ``weight`` is the heartbeat's weight.
    Like a real engine it heart-beats every ``interval`` seconds and on every in-flight change.
    """

    def __init__(self, nc: Client, worker: str, *, models: tuple[str, ...] = ("test-model",), slots: int = 1,
                 in_flight: int = 0, interval: float = 0.2, service_time: float | None = None,
                 weight: float = 1.0) -> None:
        self.nc = nc
        self.worker = worker
        self.models = models
        self.slots = slots
        self.in_flight = in_flight
        self.interval = interval
        self.service_time = service_time
        self.busy = False
        self.silent = False
        self.weight = weight
        self.refusal: str | None = None
        self.on_accept: Callable[[InferenceRequest], None] | None = None
        self.reply_delay = 0.0
        self.release: asyncio.Event | None = None  # when set to an Event: dispatches are answered once it is set
        self.received: list[InferenceRequest] = []
        self.probes = 0  # redelivery probes answered (never counted as dispatches)
        self.dispatch_requests = 0
        self._seq = 0
        self._started = time.time()
        self._sub: Subscription | None = None
        self._beat: asyncio.Task[None] | None = None
        self._finishing: set[asyncio.Future[None]] = set()

    @property
    def received_ids(self) -> list[str]:
        """Ids of accepted requests, in arrival order."""
        return [r.id for r in self.received]

    async def start(self, *, heartbeat: bool = True) -> EngineDouble:
        """Listen for dispatches and (unless told not to) start heart-beating."""
        self._sub = await self.nc.subscribe(names.engine_generate(self.worker), cb=self._on_generate)
        if heartbeat:
            self.start_heartbeats()
        await bus.flush(self.nc)
        return self

    def start_heartbeats(self) -> None:
        """Heart-beat every ``interval`` seconds from now on."""
        if self._beat is None:
            self._beat = asyncio.create_task(self._beat_loop())

    async def stop_heartbeats(self) -> None:
        """Fall silent, as a hung or partitioned engine does (dispatches are still answered)."""
        if self._beat is not None:
            await cancel_and_wait(self._beat)
            self._beat = None

    async def stop(self) -> None:
        """Stop heart-beating and answering."""
        await self.stop_heartbeats()
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    def status(self) -> EngineHeartbeat:
        """The heartbeat this engine would send now (a new ``seq`` each call)."""
        self._seq += 1
        return EngineHeartbeat(worker=self.worker, engine="double", device="cpu",
                               models=[ServedModel(id=m) for m in self.models], slots=self.slots,
                               in_flight=self.in_flight, seq=self._seq, ts=time.time(), interval=self.interval,
                               started=self._started, weight=self.weight)

    async def heartbeat(self) -> None:
        """Publish a heartbeat now."""
        await self.nc.publish(names.worker_status(self.worker), encode(self.status()))

    async def finish(self, count: int = 1) -> None:
        """``count`` accepted requests end: free their slots and announce it."""
        self.in_flight = max(0, self.in_flight - count)
        await self.heartbeat()

    async def _beat_loop(self) -> None:
        while True:
            await self.heartbeat()
            await asyncio.sleep(self.interval)

    async def _on_generate(self, msg: Msg) -> None:
        req = _request_decoder.decode(msg.data)
        if req.probe and not self.silent:  # like the real engine: "do you run this id?", never a dispatch
            self.probes += 1
            await msg.respond(encode(DispatchReply(accepted=req.id in self.received_ids, worker=self.worker,
                                                   in_flight=self.in_flight, slots=self.slots)))
            return
        self.dispatch_requests += 1
        if self.silent:
            return
        if self.reply_delay:
            await asyncio.sleep(self.reply_delay)
        if self.release is not None:
            await self.release.wait()
        if self.refusal or self.busy or self.in_flight >= self.slots:
            code, text = (self.refusal, "refused by the engine double") if self.refusal else \
                (ErrorCode.ENGINE_BUSY, "all slots busy")
            reply = DispatchReply(accepted=False, worker=self.worker, in_flight=self.in_flight, slots=self.slots,
                                  status_seq=self.status().seq, code=code, message=text)
            await msg.respond(encode(reply))
            return
        self.received.append(req)
        if self.on_accept is not None:
            self.on_accept(req)
        self.in_flight += 1
        status = self.status()
        await msg.respond(encode(DispatchReply(accepted=True, worker=self.worker, in_flight=self.in_flight,
                                               slots=self.slots, status_seq=status.seq)))
        await self.nc.publish(names.worker_status(self.worker), encode(status))
        if self.service_time is not None:
            asyncio.get_running_loop().call_later(self.service_time, self._finish_soon)

    def _finish_soon(self) -> None:
        task = asyncio.ensure_future(self.finish())
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)
