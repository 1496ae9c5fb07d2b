"""One scheduler replica on the bus: the take loop and every subscription.

The take loop waits until some live engine has a free slot, then takes work from the
highest non-empty lane (``LaneBook.plan``), never more messages than there are free slots;
each message is admitted at once (``QueueDispatcher.admit`` reserves its engine slot) and its
dispatch runs as its own task, so dispatches to engines overlap. When every lane is believed
empty, the loop sleeps on an event rung by the core "doorbell" subscription to
``llm.v1.infer.submit.*``, by heartbeats and by engine replies: no pull request is ever left
parked on the server, and while no capacity exists the messages stay in JetStream.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from contextlib import AsyncExitStack

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.micro.service import Service
from prometheus_client import CollectorRegistry

from schemas import names
from schemas.errors import ErrorCode
from schemas.events import StreamError, encode
from schemas.inference import CancelRequest
from schemas.names import LANES_BY_PRIORITY, Lane
from services.common.bus import BUS_DOWN
from services.common.lifecycle import cancel_and_wait
from services.common.worker_table import WorkerTable
from services.scheduler.config import SchedulerConfig
from services.scheduler.dispatch import QueueDispatcher, RequestMemory
from services.scheduler.lanes import LaneBook, Take
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.circuit import CircuitBreakers
from services.scheduler.cold_start import ColdStarter
from services.scheduler.placement import Placement
from services.common.buckets import optional_kv
from services.scheduler.prompt_cache import PromptCache
from services.common.recent import RecentIds
from services.scheduler.strategies import Strategy
from services.scheduler.status import SchedulerStatus, register, worker_views
from services.scheduler.strategy_watch import StrategyWatch
from services.scheduler.workers import WorkerTracker

log = logging.getLogger(__name__)

_cancel_decoder = msgspec.json.Decoder(CancelRequest)

# Pause after a failed fetch (bus down, JetStream error) before trying again.
_BUS_RETRY = 0.5


class ConsumerMissing(RuntimeError):
    """A lane's durable consumer does not exist: provisioning has not been applied."""


class Scheduler:
    """A scheduler replica: ``async with Scheduler(nc, config, registry):`` runs it until the block ends.

    Leaving the block stops taking work, lets dispatches under way finish (up to
    ``drain_timeout``) and releases every subscription; the caller then drains ``nc``.
    """

    def __init__(self, nc: Client, config: SchedulerConfig, registry: CollectorRegistry) -> None:
        self.config = config
        self.table = WorkerTable()
        self.placement = Placement(self.table, strategy=config.strategy, weights=config.weights,
                                   load_penalty=config.affinity_load_penalty,
                                   breakers=CircuitBreakers(failures=config.circuit_failures,
                                                            cooldown=config.circuit_cooldown))
        self.metrics = SchedulerMetrics(registry)
        self.metrics.watch_circuits(self.placement.circuit_states)
        self.memory = RequestMemory(cancelled=RecentIds(config.recent_ttl), accepted=RecentIds(config.recent_ttl))
        self.lanes = LaneBook(fetch_wait=config.fetch_wait, probe_wait=config.probe_wait, max_batch=config.max_batch,
                              starvation_limit=config.starvation_limit)
        self._nc = nc
        self._js: JetStreamContext = nc.jetstream()
        self._wake = asyncio.Event()
        self._reconcile_now = asyncio.Event()  # set after an empty fetch: the stats loop asks the stream at once
        self._stopping = False
        self.failed = asyncio.Event()  # set if a loop crashed: the process should exit
        self._loops: list[asyncio.Task[None]] = []
        self._dispatches: set[asyncio.Task[None]] = set()
        # Messages of each lane this replica has taken and not settled, or handed back and not yet due.
        self._held: dict[Lane, int] = dict.fromkeys(LANES_BY_PRIORITY, 0)
        self._consumers: dict[Lane, JetStreamContext.PullSubscription] = {}
        self._micro: Service | None = None
        self._stack = AsyncExitStack()
        self._feed = WorkerTracker(nc, self._js, self.table, expire_interval=config.expire_interval,
                                   on_change=self._wake.set, on_health=self.metrics.workers_healthy.set,
                                   after_expiry=self._end_lost_requests)
        self._dispatcher = QueueDispatcher(nc, self.placement, self.metrics, self.memory,
                                           dispatch_timeout=config.dispatch_timeout, max_attempts=config.max_attempts,
                                           retry_delay=config.retry_delay, max_retry_delay=config.max_retry_delay,
                                           on_release=self._wake.set, on_defer=self._expect_later)
        self._strategy_watch = StrategyWatch(self._js, self._set_strategy)

    async def __aenter__(self) -> Scheduler:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Bind the lane consumers, subscribe, register the micro service and start taking work."""
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise

    async def _start(self) -> None:
        for lane in LANES_BY_PRIORITY:
            self._consumers[lane] = await self._bind(lane)
        await self._feed.start()
        self._stack.push_async_callback(self._feed.stop)
        if self.config.cache_enabled and (kv := await optional_kv(self._js, names.PROMPT_CACHE_BUCKET, "the prompt cache is off")) is not None:
            cache = await self._stack.enter_async_context(PromptCache(
                self._nc, kv, mirror_bytes=self.config.cache_mirror_bytes,
                check_interval=self.config.cache_mirror_check))
            self._dispatcher.use_cache(cache)
        if self.config.cold_start:
            self._dispatcher.use_cold_start(ColdStarter(self._nc, self._js, self.placement,
                                                        timeout=self.config.cold_start_timeout))
        await self._strategy_watch.start()
        self._stack.push_async_callback(self._strategy_watch.stop)
        for subject, cb in ((names.INFER_CANCEL, self._on_cancel), (names.INFER_SUBMIT_ALL, self._on_doorbell)):
            sub = await self._nc.subscribe(subject, cb=cb)
            self._stack.push_async_callback(sub.unsubscribe)
        self._micro = await register(self._nc, self.status)
        self._stack.push_async_callback(self._micro.stop)
        self._loops = [asyncio.create_task(self._take_loop(), name="scheduler-take"),
                       asyncio.create_task(self._stats_loop(), name="scheduler-stats")]
        for task in self._loops:
            task.add_done_callback(self._loop_ended)
        self._stack.push_async_callback(self._stop_loops)
        log.info("scheduler %s taking work from %s (lanes %s)", self._micro.id, names.INFER_STREAM,
                 ", ".join(LANES_BY_PRIORITY))

    async def _bind(self, lane: Lane) -> JetStreamContext.PullSubscription:
        durable = names.scheduler_durable(lane)
        try:
            await self._js.consumer_info(names.INFER_STREAM, durable)
        except nats.js.errors.NotFoundError as exc:
            raise ConsumerMissing(f"JetStream consumer {durable} on {names.INFER_STREAM} is missing: apply "
                               "infra/nats/jetstream.toml first (the scheduler never creates streams)") from exc
        psub = await self._js.pull_subscribe_bind(durable=durable, stream=names.INFER_STREAM)
        self._stack.push_async_callback(psub.unsubscribe)
        return psub

    async def stop(self) -> None:
        """Stop taking work, finish dispatches under way (up to ``drain_timeout``), release everything."""
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        await self._stack.aclose()

    async def _stop_loops(self) -> None:
        take, stats = self._loops
        await cancel_and_wait(stats)
        # The take loop ends after its current fetch (at most fetch_wait) once _stopping is set.
        await asyncio.gather(take, return_exceptions=True)
        await self._drain_dispatches()

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.error("scheduler loop %s crashed", task.get_name(), exc_info=task.exception())
        self.failed.set()

    async def _drain_dispatches(self) -> None:
        if not self._dispatches:
            return
        _, pending = await asyncio.wait(set(self._dispatches), timeout=self.config.drain_timeout)
        if pending:
            log.warning("%d dispatch(es) still under way after %.1fs: abandoned (JetStream redelivers them)",
                        len(pending), self.config.drain_timeout)
            await cancel_and_wait(*pending)

    # --- the take loop ---

    async def _take_loop(self) -> None:
        while not self._stopping:
            take = self.lanes.plan(self.placement.capacity())
            if take is None:
                await self._idle()
                continue
            for msg in await self._fetch(take):
                self._admit(take.lane, msg)

    async def _idle(self) -> None:
        """Sleep until a doorbell, a heartbeat, an engine reply, a deferred message or a queue hint."""
        self._wake.clear()
        await self._wake.wait()

    async def _fetch(self, take: Take) -> list[Msg]:
        try:
            msgs = await self._consumers[take.lane].fetch(take.batch, timeout=take.wait)
        except (TimeoutError, nats.errors.TimeoutError):  # nothing arrived within take.wait
            msgs = []
        except (nats.js.errors.APIError, *BUS_DOWN) as exc:
            log.warning("fetch from lane %s failed (retrying in %.1fs): %s", take.lane, _BUS_RETRY, exc)
            self.lanes.sweep()  # what we knew is stale now: probe everything once the bus is back
            await asyncio.sleep(_BUS_RETRY)
            return []
        if not msgs:
            self.lanes.settle(take, 0)
            # Empty although doorbells rang: a peer took the messages, or the stream had not
            # stored them within the wait. Ask the stream now rather than at the next interval.
            self._reconcile_now.set()
            return msgs
        meta = msgs[-1].metadata
        self.lanes.settle(take, len(msgs), meta.num_pending, meta.num_delivered > 1)
        self.metrics.pending(take.lane, meta.num_pending)
        return msgs

    def _admit(self, lane: Lane, msg: Msg) -> None:
        work = self._dispatcher.admit(lane, msg)
        if work is None:
            return
        task = asyncio.create_task(work)
        self._dispatches.add(task)
        self._held[lane] += 1
        task.add_done_callback(functools.partial(self._dispatch_ended, lane))

    def _dispatch_ended(self, lane: Lane, task: asyncio.Task[None]) -> None:
        self._dispatches.discard(task)
        self._held[lane] -= 1
        if not task.cancelled() and task.exception() is not None:
            log.error("dispatch failed unexpectedly (JetStream redelivers the message)", exc_info=task.exception())

    def _expect_later(self, lane: Lane, delay: float) -> None:
        """A message handed back to ``lane`` falls due after ``delay``: expect it then."""
        self._held[lane] += 1
        asyncio.get_running_loop().call_later(delay, self._expect_now, lane)

    def _expect_now(self, lane: Lane) -> None:
        self._held[lane] -= 1
        self.lanes.expect(lane)
        self._wake.set()

    @property
    def prompt_cache(self) -> PromptCache | None:
        """The prompt cache this replica answers hits from (None when it is off or its bucket is missing)."""
        return self._dispatcher.cache

    def _set_strategy(self, strategy: Strategy | None) -> None:
        """Switch routing to ``strategy`` (None: back to the configured one), from the watched KV key."""
        chosen = strategy or self.config.strategy
        if chosen is not self.placement.strategy:
            log.info("routing strategy: %s -> %s", self.placement.strategy, chosen)
            self.placement.strategy = chosen

    # --- subscriptions ---

    async def _on_doorbell(self, msg: Msg) -> None:
        try:
            lane = names.lane_of_subject(msg.subject)
        except ValueError:  # a submit subject outside the known lanes: nobody consumes it
            return
        self.lanes.ring(lane)
        self._wake.set()

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            cancel = _cancel_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            log.warning("ignoring malformed cancel: %s", exc)
            return
        self.memory.cancelled.add(cancel.id)
        self.memory.running.discard(cancel.id)  # its producer is gone: no worker_lost for it

    async def _end_lost_requests(self) -> None:
        """Send ``worker_lost`` to the producer of each request this replica saw accepted by an engine that
        is dead now (missed three heartbeats) and that does not watch the engine itself, so it never hangs on a dead one."""
        lost = self.memory.running.lost(self.table)
        if not lost:
            return
        for run in lost:
            error = StreamError(id=run.request_id, code=ErrorCode.WORKER_LOST, dispatch=run.dispatch,
                                message=f"engine {run.worker} stopped heart-beating while running this request")
            try:
                await self._nc.publish(run.reply_to, encode(error))
            except BUS_DOWN as exc:  # the producer falls back on its own deadline
                log.warning("could not send worker_lost to request %s: %s", run.request_id, exc)
        self.metrics.worker_lost.inc(len(lost))
        log.warning("%d request(s) ended with worker_lost: their engine stopped heart-beating", len(lost))

    async def _stats_loop(self) -> None:
        """Every ``stats_interval``, and at once after an empty fetch, reconcile each lane with consumer
        info, off the take loop.

        Undelivered messages nothing rang for (a doorbell lost in a reconnect) show in
        ``num_pending``; messages due for redelivery (a dead peer's, after ack_wait) show as more
        acknowledgements pending than this replica holds. Either wakes the take loop.
        """
        while True:
            try:
                await asyncio.wait_for(self._reconcile_now.wait(), self.config.stats_interval)
            except TimeoutError:
                pass
            self._reconcile_now.clear()
            for lane in LANES_BY_PRIORITY:
                try:
                    info = await self._js.consumer_info(names.INFER_STREAM, names.scheduler_durable(lane))
                except (nats.errors.TimeoutError, nats.js.errors.APIError, *BUS_DOWN) as exc:
                    log.debug("consumer info for lane %s unavailable: %s", lane, exc)
                    continue
                pending = info.num_pending or 0
                self.metrics.pending(lane, pending)
                hinted = self.lanes.hint(lane, pending)
                if (info.num_ack_pending or 0) > self._held[lane]:
                    self.lanes.suspect(lane)
                    hinted = True
                if hinted:
                    self._wake.set()

    def status(self) -> SchedulerStatus:
        """A snapshot of this replica for the micro ``status`` endpoint."""
        return SchedulerStatus(
            instance=self._micro.id if self._micro else "",
            capacity=self.placement.capacity(),
            dispatching=len(self.memory.dispatching),
            lanes={lane.value: self.lanes.expected(lane) for lane in LANES_BY_PRIORITY},
            requests=self.metrics.request_counts(),
            workers=worker_views(self.table, self.placement.reserved, time.monotonic()),
            strategy=self.placement.strategy.value,
            circuits_open=self.placement.breakers.open_count(),
        )
