"""The engine process on the bus: accepts dispatches, streams tokens, heartbeats, honours cancel.

Only this module talks to NATS; the model work is behind ``EngineBackend``.

Cancels and withdrawals leave tombstones (``offers.OfferBook``), so that a late read of a dispatch
never runs it, and a withdrawn offer under way stops without a terminal event.

Health is checked, not assumed (``health.HealthMonitor``): every backend's ``check_health`` runs
each heartbeat interval and after any backend exception, and its verdict is in every heartbeat.
A failed engine ends its in-flight requests at once with ``engine_failed`` (the edge's failover
re-dispatches them) and refuses new ones. An engine that was itself stopped for longer than
three heartbeat intervals (SIGSTOP, a stalled host) has been declared dead by everyone else and
its requests moved: it ends them the same way, before sending any more of their tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
import time

import msgspec
import nats.micro
from nats.errors import Error as NatsError
from nats.micro.request import Request

from schemas import names
from schemas.errors import BusError, ErrorCode
from schemas.events import StreamStart, Usage, encode
from schemas.heartbeat import EngineHeartbeat
from schemas.inference import CancelRequest, DispatchReply, InferenceRequest
from services.common import bus, bus_permissions, gc_heap, rate_counters
from services.common.buckets import optional_kv
from services.common.model_store import default_state_dir
from services.engine.backend import AdapterChange, Chunk, EngineBackend
from services.engine.config import EngineConfig
from services.engine.health import HealthMonitor, HealthState
from services.engine.replies import ReplySender, Send
from services.engine.heartbeats import DecodeSpeed, Heartbeats
from services.engine.control import ModelControl
from services.engine.grammar.compiler import set_compile_observer
from services.engine.model_host import BackendFactory, HostedModel, ModelHost
from services.engine.metrics import EngineMetrics
from services.engine.offers import OfferBook
from services.engine.progress import Progress
from services.engine.response_cache import ResponseRecorder, ResponseStore

log = logging.getLogger(__name__)


_request_decoder = msgspec.json.Decoder(InferenceRequest)
_cancel_decoder = msgspec.json.Decoder(CancelRequest)


class EngineService:
    """One engine worker: ``llm.v1.engine.<worker>.generate`` in, token events out."""

    def __init__(self, config: EngineConfig, backend: EngineBackend, metrics: EngineMetrics, *,
                 factory: BackendFactory | None = None, state_dir=None) -> None:
        self.cfg = config
        self.metrics = metrics
        self.host = ModelHost(config, backend, factory, state_dir=state_dir or default_state_dir(),
                              on_change=self._on_models, on_adapters=self._on_adapters)
        # Which loaded model each active request runs on.
        self._running_on: dict[str, HostedModel] = {}
        self.worker = names.token(config.worker_id)
        self._active: dict[str, asyncio.Task] = {}
        self._offers = OfferBook()  # which offer each active id runs under; tombstones of the others
        self._health = HealthMonitor(self.host.backends, interval=config.heartbeat_interval,
                                     on_change=self._on_health,
                                     on_check=lambda s: metrics.health_checks.labels(s.health.value).inc())
        self._beats = Heartbeats(self.worker, config.heartbeat_interval, self.heartbeat,
                                 on_periodic=self._sample_gauges, on_stall=self._end_in_flight)
        self._speed = DecodeSpeed()
        self._draining = False
        self._started = time.time()
        self.nc = None
        self._replies = ReplySender(lambda: self.nc.publish, enabled=config.reply_socket,
                                    directory=config.reply_socket_dir)
        self._responses: ResponseStore | None = None
        self.ready = asyncio.Event()  # set once every subscription is on the server: dispatches are answered
        set_compile_observer(metrics.grammar_compile.observe)

    @property
    def health_state(self):
        """The last verdict of the backends' health checks."""
        return self._health.state

    @property
    def draining(self) -> bool:
        """Whether the engine has stopped taking work (shutting down)."""
        return self._draining

    # --- lifecycle ---
    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then drain in the fixed order of STYLE.md."""
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(lambda: bus.drain(self.nc))  # last: after the models are closed
            await self.host.start()
            stack.push_async_callback(self.host.close)
            self.nc = await bus.connect(self.cfg, f"cy-engine-{self.worker}",
                                        inbox=names.identity_inbox(bus_permissions.ENGINE, self.worker))
            stack.push_async_callback(self._replies.close)  # after the drain: every terminal event written
            workers_kv = await self.nc.jetstream().key_value(names.WORKERS_BUCKET)
            self.host.bind_bus(self.nc.jetstream())
            self._charges = rate_counters.TokenCharges(self.nc.jetstream())  # keyed requests' token charges
            if (cache_kv := await optional_kv(self.nc.jetstream(), names.PROMPT_CACHE_BUCKET,
                                                       "responses are not cached")) is not None:
                self._responses = ResponseStore(cache_kv)
            service = await nats.micro.add_service(
                self.nc, name=names.MICRO_ENGINE, version="0.1.0",
                description=f"{self.host.name} engine serving {', '.join(m.id for m in self.host.served_models())}",
                metadata={"worker": self.worker, "engine": self.host.name, "device": self.host.device})
            await service.add_endpoint(name="generate", subject=names.engine_generate(self.worker),
                                       handler=self._on_generate)
            await self.nc.subscribe(names.INFER_CANCEL, cb=self._on_cancel)
            await self.nc.subscribe(names.engine_cancel(self.worker), cb=self._on_withdraw)
            control = ModelControl(self.host, self.worker, heartbeat=self.heartbeat, draining=lambda: self._draining,
                                   unload_timeout=self.cfg.drain_timeout)
            stack.push_async_callback(control.close)
            for subject in (names.engine_control(self.worker), names.ENGINE_CONTROL_ALL):
                await self.nc.subscribe(subject, cb=control.on_message)
            self._beats.start(self.nc, workers_kv)
            await stack.enter_async_context(self._health)
            await bus.flush(self.nc)  # its PONG proves the subscriptions are on the server
            gc_heap.started(self.metrics.gc_pause)
            self.ready.set()
            log.info("engine %s (%s on %s) serving %s", self.worker, self.host.name, self.host.device,
                     [m.id for m in self.host.served_models()])
            await stop.wait()
            await self._drain()
            await self._beats.stop()
            await service.stop()
            if self._responses is not None:
                await self._responses.flush()
            await self._charges.settle()  # keyed requests' token charges still on their way to LLM_RATE
            await self._beats.forget()

    async def _drain(self) -> None:
        """Advertise draining, stop taking work, let in-flight requests finish within the drain timeout."""
        self._draining = True
        await self._beats.publish(force_kv=True)
        if self._active:
            log.info("draining: waiting up to %.0fs for %d requests", self.cfg.drain_timeout, len(self._active))
            _, pending = await asyncio.wait(list(self._active.values()), timeout=self.cfg.drain_timeout)
            for task in pending:  # past the drain timeout: each still sends its terminal event (``_run``)
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)

    def stop_taking_work(self) -> None:
        """Advertise draining and refuse new dispatches, but keep running: the requests in flight finish at
        their own pace, however long, and the process stays until stopped (SIGUSR1; ``./cy up`` retiring
        an engine sends it first and SIGTERM once the heartbeats show nothing in flight)."""
        if not self._draining:
            log.info("draining: no new work; %d request(s) in flight finish", len(self._active))
            self._draining = True
            self._beats.changed()

    # --- dispatch ---
    def _reply(self, accepted: bool, code: str | None = None, message: str | None = None) -> bytes:
        return encode(DispatchReply(accepted=accepted, worker=self.worker, in_flight=len(self._active),
                                    slots=self.host.slots, status_seq=self._beats.seq, code=code, message=message))

    async def _on_generate(self, request: Request) -> None:
        try:
            req = _request_decoder.decode(request.data)
        except msgspec.DecodeError as exc:
            await request.respond(self._reply(False, ErrorCode.INVALID_REQUEST, f"bad request: {exc}"))
            return
        if req.probe:  # a scheduler re-taking a redelivered message: only "is it (or was it just) here?"
            await request.respond(self._reply(req.id in self._active or req.id in self._offers.finished))
            return
        # Where its events go, chosen before the checks below (opening an edge's socket may wait): from them
        # to the request's start nothing awaits.
        send = await self._replies.sender(req)
        # Let the cancels already read from the socket run first: an engine whose event loop was blocked
        # past the scheduler's dispatch_timeout reads the offer and its withdrawal in the same read.
        await asyncio.sleep(0)
        if (refusal := self._offers.refusal(req, self.worker)) is not None:
            await request.respond(self._reply(False, *refusal))
            return
        if req.id not in self._active and (target := self.host.route(req.model)) is not None:
            try:  # what this engine cannot serve is refused now, not after the dispatch was accepted
                target.backend.check_request(req)
                if req.adapter:
                    await target.backend.check_adapter(req.adapter)
            except BusError as exc:
                await request.respond(self._reply(False, exc.code, exc.message))
                return
        if req.id in self._active:  # a re-dispatch of a request we already run: idempotent
            await request.respond(self._reply(True))
            return
        if self._draining:
            await request.respond(self._reply(False, ErrorCode.ENGINE_BUSY, "engine is draining"))
            return
        if self._health.state.failed:  # not final for the scheduler: another engine is tried
            await request.respond(self._reply(False, ErrorCode.ENGINE_FAILED,
                                              f"engine {self.worker} failed: {self._health.state.reason}"))
            return
        if len(self._active) >= self.host.slots:
            await request.respond(self._reply(False, ErrorCode.ENGINE_BUSY, "all slots are busy"))
            return
        hosted = self.host.route(req.model)
        if hosted is None:
            await request.respond(self._reply(False, ErrorCode.MODEL_NOT_FOUND,
                                              f"model {req.model!r} is not loaded on {self.worker}"))
            return
        self.host.begin(hosted)  # before any await: an eviction must see the request
        self._running_on[req.id] = hosted
        self._offers.begin(req)
        model = self.host.served_id(req.model) or hosted.id
        self._active[req.id] = asyncio.create_task(self._run(req, model, send))
        self._beats.changed()
        # StreamStart before "accepted", on the same connection: NATS delivers one connection's
        # messages in the order sent, so the producer knows which engine runs the request no later
        # than the scheduler learns it was accepted (and acks it). An engine that dies right after
        # accepting is then found by its missed heartbeats and the producer re-dispatches,
        # instead of waiting for its deadline. Both go out in the same socket write: no added latency.
        # Through the edge's reply socket it is written before "accepted" is, to a reader with no server
        # between: the edge has it at least as early, though no longer by a guarantee of NATS.
        await send(encode(StreamStart(id=req.id, worker=self.worker, model=model, dispatch=req.dispatch)))
        await request.respond(self._reply(True))

    async def _on_cancel(self, msg) -> None:
        try:
            cancel = _cancel_decoder.decode(msg.data)
        except msgspec.DecodeError:
            log.warning("ignoring malformed cancel on %s", msg.subject)
            return
        self._offers.cancel(cancel.id)  # a dispatch of it read after this is refused
        if cancel.id in self._active and (hosted := self._running_on.get(cancel.id)) is not None:
            log.info("cancel %s (%s)", cancel.id, cancel.reason)
            await hosted.backend.abort(cancel.id)

    async def _on_withdraw(self, msg) -> None:
        """One offer of a request is withdrawn from this engine: refuse it if it comes later, stop it silently
        if it runs (its reply subject is another engine's now)."""
        try:
            cancel = _cancel_decoder.decode(msg.data)
        except msgspec.DecodeError:
            log.warning("ignoring malformed withdrawal on %s", msg.subject)
            return
        task = self._active.get(cancel.id)
        if self._offers.withdraw(cancel.id, cancel.dispatch) and task is not None:
            self._replies.stop_writer(cancel.id)
            log.warning("offer %d of %s withdrawn (%s): stopping it without a word", cancel.dispatch, cancel.id,
                        cancel.reason)
            # At once, even before the backend knows the id; a task that has not begun is never cancelled
            # (its ``finally`` would not run): ``_run`` sees it silenced first thing instead.
            if inspect.getcoroutinestate(task.get_coro()) != inspect.CORO_CREATED:
                task.cancel()

    # --- one request ---
    async def _run(self, req: InferenceRequest, model: str, send: Send) -> None:
        """Generate ``req`` and send its events with ``send`` (to ``req.reply_to`` or its edge's reply socket,
        after the ``StreamStart`` that ``_on_generate`` sent); always ends with one terminal event."""
        progress = Progress()
        start = time.monotonic()
        outcome = "ok"
        recorder = ResponseRecorder(model) if req.cache_key and self._responses is not None else None
        try:
            if req.id in self._offers.silenced:
                raise asyncio.CancelledError  # withdrawn before it began: the same path as a withdrawal under way
            if req.id in self._offers.ending:  # given up on before it began (see ``_end_in_flight``)
                raise BusError(ErrorCode.ENGINE_FAILED, self._offers.ending[req.id])
            await self._generate(req, model, start, progress, recorder, send)
            if progress.terminal is None:
                outcome = "cancelled"
                progress.fail(req, ErrorCode.CANCELLED, "request cancelled")
        except BusError as exc:
            outcome = exc.code
            progress.fail(req, exc.code, exc.message, exc.param)
            if exc.code in (ErrorCode.ENGINE_FAILED, ErrorCode.INTERNAL) and req.id not in self._offers.ending:
                self._health.poke()  # the backend gave up on a request: is it still able to serve?
        except asyncio.CancelledError:
            outcome = "withdrawn" if req.id in self._offers.silenced else ErrorCode.ENGINE_FAILED \
                if req.id in self._offers.ending else "aborted"
            progress.fail(req, ErrorCode.ENGINE_FAILED,
                          self._offers.ending.get(req.id, "engine shut down before the request finished"))
            await self._abort(req.id)
        except Exception as exc:  # the engine must answer every request, whatever the backend did
            log.exception("request %s failed", req.id)
            self._health.poke()
            outcome = ErrorCode.INTERNAL
            progress.fail(req, ErrorCode.INTERNAL, f"engine error: {type(exc).__name__}: {exc}")
        finally:
            if req.id in self._offers.silenced:  # withdrawn: the reply subject is another engine's now
                progress.terminal = None
            if progress.terminal is not None and not self.nc.is_closed:
                with contextlib.suppress(NatsError):
                    await send(progress.terminal)
            if outcome == "ok" and progress.cached is not None and self._responses is not None and req.cache_key:
                self._responses.store(req.cache_key, progress.cached)  # after the terminal event, in the background
            self._active.pop(req.id, None)
            self._offers.end(req.id)
            self.host.end(self._running_on.pop(req.id))
            self._beats.changed()
            self.metrics.requests.labels(model, outcome).inc()

    async def _generate(self, req: InferenceRequest, model: str, start: float, progress: Progress,
                        recorder: ResponseRecorder | None, send: Send) -> None:
        """Send the backend's deltas; on its final event, set ``progress.terminal`` (and the cacheable response)."""
        backend = self._running_on[req.id].backend
        writer = self._replies.writer(req.id, send, lambda chunk: progress.delta(req, chunk),
                                      lambda chunk: progress.sent(chunk, recorder), self._beats.stalled) \
            if self.cfg.thread_writes else None
        if writer is not None and not backend.write_through(req.id, writer):
            self._replies.end_writer(req.id)  # no model thread of ours: the loop sends every chunk
            writer = None
        events = backend.generate(req)
        try:
            async for event in events:
                if self._beats.stalled():
                    self._end_in_flight(self._beats.stall_reason())
                if req.id in self._offers.ending:  # given up on: not one more token (the cancel lands right here)
                    await asyncio.sleep(0)
                    raise asyncio.CancelledError
                if isinstance(event, Chunk):  # one the model thread's writer did not take
                    await send(progress.delta(req, event))
                    progress.sent(event, recorder)
                else:
                    usage = Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens)
                    progress.end(req, event.reason, usage, event.cached_tokens)
                    if recorder is not None:
                        progress.cached = recorder.finished(event.reason, usage)
                    self.metrics.observe_finished(model, start, progress.first, usage)
                    if progress.first and usage.completion_tokens > 1:  # one stream's decode speed, heartbeated
                        self._speed.observe(usage.completion_tokens - 1, time.monotonic() - progress.first)
                    if req.rate_caller:  # an API key's NATS-native request spends its key's token budget
                        self._charges.charge(req.rate_caller, usage.prompt_tokens + usage.completion_tokens)
        finally:
            if writer is not None:
                backend.write_through(req.id, None)
                self._replies.end_writer(req.id)
            await events.aclose()

    async def _abort(self, request_id: str) -> None:
        """Stop ``request_id`` in its backend; a backend too broken to abort is logged, not raised (the
        request's terminal event must still go out)."""
        try:
            await self._running_on[request_id].backend.abort(request_id)
        except Exception:  # a failed engine (vLLM's dead core) may raise on abort too
            log.exception("could not abort %s in the backend", request_id)

    # --- health ---
    def _on_health(self, old: HealthState, new: HealthState) -> None:
        """The health checks changed their verdict: heartbeat it at once; a failed engine gives up its requests."""
        self._beats.changed()
        if new.failed:
            self._end_in_flight(f"engine {self.worker} failed: {new.reason}")

    def _end_in_flight(self, reason: str) -> None:
        """End every in-flight request with ``engine_failed`` (``reason``) and no more tokens.

        A task that has not begun is not cancelled (its ``finally`` would not run): ``_run`` sees
        it ending first thing instead. The producer's failover takes each request elsewhere.
        """
        for request_id, task in self._active.items():
            if not self._offers.give_up(request_id, reason):
                continue
            self._replies.stop_writer(request_id)
            log.warning("ending %s: %s", request_id, reason)
            if inspect.getcoroutinestate(task.get_coro()) != inspect.CORO_CREATED:
                task.cancel()

    def _on_adapters(self, change: AdapterChange) -> None:
        """The engine loaded or evicted adapters: count it and heartbeat the new set at once."""
        self.metrics.observe_adapters(len(self.host.loaded_adapters()), change)
        self._beats.changed()

    def _on_models(self) -> None:
        """A model was loaded or unloaded: count it and heartbeat the new set at once."""
        self.metrics.models_loaded.set(len(self.host))
        self._beats.changed()

    # --- heartbeats ---
    def heartbeat(self) -> EngineHeartbeat:
        """This engine's status now."""
        return EngineHeartbeat(
            worker=self.worker, engine=self.host.name, device=self.host.device,
            models=self.host.served_models(), adapters=self.host.loaded_adapters(), slots=self.host.slots,
            max_models=self.cfg.max_models, memory_budget=self.cfg.memory_budget, in_flight=len(self._active),
            seq=self._beats.seq, ts=time.time(), interval=self.cfg.heartbeat_interval, draining=self._draining,
            memory_bytes=self.host.memory_bytes(), pid=os.getpid(), host=socket.gethostname(),
            started=self._started, engine_reason=self.cfg.engine_reason, health=self._health.state.health.value,
            health_reason=self._health.state.reason, tokens_per_second=round(self._speed.tokens_per_second, 1))

    def _sample_gauges(self) -> None:
        """Every heartbeat interval: the gauges that are not kept current as they change."""
        self.metrics.in_flight.set(len(self._active))
        self.metrics.memory.set(self.host.memory_bytes())
        self.metrics.observe_prefix_cache(self.host.prefix_cache_stats())
        self.metrics.observe_joins(self.host.join_stats())
