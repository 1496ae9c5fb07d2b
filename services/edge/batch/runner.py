"""The batch runner every edge runs: a share of the durable pull consumer ``batch_runners``.

It takes a batch's start (publish its lines) and its lines (run each on the low lane, record the
outcome once in KV, then ack). Nothing about a batch lives in a runner: a runner killed at any
moment leaves its unacked work to JetStream, which hands it to another runner after ``ack_wait``;
that runner sees a line that already has an outcome and only acks it, or runs it again under the
next delivery's request id (the dead runner's generation is cancelled by its old id). The runner
that records a batch's last line assembles its output and error files (``finish``).
Cancel and expiry stop a batch's running lines through the ordinary request cancel path (the
``InferenceCall`` broadcasts ``CancelRequest`` as it is left) and record them, and every line not
yet run, as ``batch_cancelled`` / ``batch_expired``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time

import msgspec
import nats.errors
import nats.js.errors

from schemas import names
from schemas.batch import (CANCELLED, CANCELLING, EXPIRED, FAILED, IN_PROGRESS, SKIP, TERMINAL, VALIDATING,
                           BatchError, BatchLine, BatchStart, BatchState)
from schemas.errors import BusError, ErrorCode
from services.common.lifecycle import cancel_and_wait
from services.edge.auth.rate_limit import Admission, RateLimited
from services.common.rate_window import RateLimits
from services.edge.batch import lines
from services.edge.batch.execute import EXPIRED as EXPIRED_CODE, EXPIRED_MESSAGE, Outcome, Transient, line_id, run_line
from services.edge.batch.finish import finish_batch
from services.edge.batch.store import BatchStore
from services.edge.metrics import EdgeMetrics
from services.edge.state import Edge
from services.edge.training.store import TrainingStore

log = logging.getLogger(__name__)

_STOP_CHECK = 0.5  # seconds between looks at the state of batches with running lines
_RETRY_DELAY = 2.0  # seconds before a line that met a transient failure is taken again
_FETCH_WAIT = 2.0
_PATIENCE = 5  # deliveries a line is retried after a failure that may pass (``run_line``'s ``patient``)
_start_decoder = msgspec.json.Decoder(BatchStart)
_line_decoder = msgspec.json.Decoder(BatchLine)


def stop_reason(state: BatchState, now: float) -> tuple[str, str] | None:
    """Why lines of ``state`` must not run (any more): cancelled or expired; ``None`` while they may."""
    if state.status in (CANCELLING, CANCELLED):
        return "batch_cancelled", "the batch was cancelled before this request finished"
    if now >= state.expires_at or state.status == EXPIRED:
        return EXPIRED_CODE, EXPIRED_MESSAGE
    return None


class BatchRunner:
    """Takes batch work from ``batch_runners``; at most ``concurrency`` lines at a time."""

    def __init__(self, edge: Edge, store: BatchStore, files: TrainingStore, *, concurrency: int,
                 edge_metrics: EdgeMetrics) -> None:
        self._edge = edge
        self._store = store
        self._files = files
        self._concurrency = concurrency
        self._sub = None
        self._tasks: set[asyncio.Task] = set()
        self._freed = asyncio.Event()
        self._stops: dict[str, asyncio.Event] = {}  # batch id -> set when its running lines must stop
        self._running: dict[str, int] = {}  # batch id -> its lines running here
        self._loops: list[asyncio.Task] = []
        self._lines_recorded = edge_metrics.batch_lines
        self._keepalive = 10.0  # seconds between in-progress acks of running work: a third of ack_wait

    async def start(self) -> None:
        """Bind the consumer and start pulling (without the consumer, batches wait for a provisioned edge)."""
        js = self._edge.nc.jetstream()
        sub = None
        try:
            # Binding does not look the consumer up; its info does (and gives the ack wait).
            sub = await js.pull_subscribe_bind(names.BATCH_DURABLE, names.BATCH_STREAM)
            ack_wait = (await sub.consumer_info()).config.ack_wait or 30.0
        except nats.js.errors.NotFoundError:
            log.warning("consumer %s of %s is missing (run ./cy infra apply): this edge runs no batches",
                        names.BATCH_DURABLE, names.BATCH_STREAM)
            if sub is not None:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()
            return
        self._sub = sub
        self._keepalive = max(0.2, ack_wait / 3)
        self._loops = [asyncio.create_task(self._pull_forever(), name="batch-pull"),
                       asyncio.create_task(self._watch_forever(), name="batch-watch")]

    async def stop(self) -> None:
        """Stop taking work; running lines are cancelled and handed back (nak) for another runner."""
        for task in self._loops:
            await cancel_and_wait(task)
        for task in list(self._tasks):
            await cancel_and_wait(task)
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()

    async def _pull_forever(self) -> None:
        while True:
            free = self._concurrency - len(self._tasks)
            if free <= 0:
                self._freed.clear()
                await self._freed.wait()
                continue
            try:
                msgs = await self._sub.fetch(free, timeout=_FETCH_WAIT)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except nats.errors.Error as exc:
                log.warning("batch runner could not fetch (%s); retrying", type(exc).__name__)
                await asyncio.sleep(1.0)
                continue
            for msg in msgs:
                task = asyncio.create_task(self._handle(msg))
                self._tasks.add(task)
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._freed.set()

    async def _watch_forever(self) -> None:
        """Tell the running lines of a batch that was cancelled or expired to stop."""
        while True:
            await asyncio.sleep(_STOP_CHECK)
            for batch_id, stop in list(self._stops.items()):
                if stop.is_set():
                    continue
                try:
                    state, _ = await self._store.get(batch_id)
                except BusError as err:
                    log.warning("batch %s: could not read its state (%s)", batch_id, err.message)
                    continue
                if stop_reason(state, time.time()) is not None:
                    stop.set()

    async def _handle(self, msg) -> None:
        """One piece of work: acked once done, handed back (nak) on a failure that is not its own."""
        keepalive = asyncio.create_task(self._keep_alive(msg))
        try:
            if msg.subject == names.BATCH_START:
                await self._start_batch(_start_decoder.decode(msg.data).batch_id)
            elif not await self._line(msg, _line_decoder.decode(msg.data)):
                return
            await msg.ack()
        except msgspec.DecodeError as exc:
            log.error("unreadable batch work on %s dropped: %s", msg.subject, exc)
            await msg.term()
        except (BusError, nats.errors.Error, TimeoutError) as exc:
            await self._failed(msg, exc)
        except asyncio.CancelledError:
            with contextlib.suppress(nats.errors.Error):
                await msg.nak()  # this runner stops: another takes the line at once
            raise
        finally:
            await cancel_and_wait(keepalive)

    @staticmethod
    async def _failed(msg, exc: Exception) -> None:
        """Drop work whose batch is gone; hand anything else back to be taken again."""
        if isinstance(exc, BusError) and exc.code == ErrorCode.NOT_FOUND:
            log.error("batch work on %s dropped: %s", msg.subject, exc.message)
            await msg.term()
            return
        log.warning("batch work on %s handed back: %s", msg.subject, getattr(exc, "message", None) or exc)
        with contextlib.suppress(nats.errors.Error):
            await msg.nak(delay=_RETRY_DELAY)

    async def _keep_alive(self, msg) -> None:
        while True:
            await asyncio.sleep(self._keepalive)
            with contextlib.suppress(nats.errors.Error):
                await msg.in_progress()

    async def _start_batch(self, batch_id: str) -> None:
        """Publish a batch's lines (again, if a runner died doing it: none is stored twice), then mark it running."""
        state, _ = await self._store.get(batch_id)
        if state.status in TERMINAL or (state.status != VALIDATING and state.in_progress_at is not None):
            return
        sink = io.BytesIO()
        try:
            await self._files.read_file_into(state.input_file_id, sink)
            parsed = lines.parse_lines(sink.getvalue().splitlines())
        except BusError as err:
            if err.code in (ErrorCode.NOT_FOUND, ErrorCode.INVALID_REQUEST):
                await self._fail(batch_id, err)
                return
            raise
        await self._store.publish_lines([BatchLine(batch_id=batch_id, index=line.index, custom_id=line.custom_id,
                                                   url=line.url, body=msgspec.Raw(line.body)) for line in parsed])
        now = int(time.time())

        def running(s: BatchState) -> BatchState | None:
            if s.in_progress_at is not None:
                return None
            status = IN_PROGRESS if s.status == VALIDATING else s.status  # a cancel may have come first
            return msgspec.structs.replace(s, status=status, in_progress_at=now)

        await self._store.change(batch_id, running)

    async def _fail(self, batch_id: str, err: BusError) -> None:
        now = int(time.time())
        error = BatchError(code=err.code, message=err.message, param="input_file_id")
        await self._store.change(batch_id, lambda s: None if s.status in TERMINAL else msgspec.structs.replace(
            s, status=FAILED, failed_at=now, errors=[error]))

    async def _line(self, msg, line: BatchLine) -> bool:
        """Run and record one line; whether it is done (to ack) rather than handed back for later."""
        state, _ = await self._store.get(line.batch_id)
        if state.status in TERMINAL:  # a late redelivery: the batch's result files already hold this line
            return True
        # Only a redelivered line can have an outcome already (its runner died after recording it).
        redelivered = (msg.metadata.num_delivered or 1) > 1
        if not redelivered or not await self._store.recorded(line.batch_id, line.index):
            reason = stop_reason(state, time.time())
            if reason is not None:
                outcome = Outcome(SKIP, lines.skipped_line(line_id(state.id, line.custom_id), line.custom_id,
                                                           *reason), 0)
            else:
                outcome = await self._run(msg, state, line)
                if outcome is None:
                    return False
            if await self._store.record(line.batch_id, outcome.kind, line.index, outcome.line):
                self._lines_recorded.labels(outcome.kind).inc()
        await finish_batch(self._store, self._files, line.batch_id, state.total)
        return True

    async def _run(self, msg, state: BatchState, line: BatchLine) -> Outcome | None:
        """The line's outcome, or None when it was handed back (its budget spent, a transient failure)."""
        delivery = msg.metadata.num_delivered or 1
        if delivery > 1:  # an earlier delivery may still generate for a runner that is gone
            await self._edge.publisher.cancel(names.batch_request_id(state.id, line.custom_id, delivery - 1),
                                              "worker_lost")
        admission = await self._admit(msg, state)
        if admission is None:
            return None
        outcome: Outcome | None = None
        try:
            outcome = await self._run_until_stopped(state, line, delivery)
        except Transient as exc:
            log.info("batch %s line %d: %s; taken again in %gs", state.id, line.index, exc, _RETRY_DELAY)
            await msg.nak(delay=_RETRY_DELAY)
            return None
        finally:
            await admission.finish(outcome.tokens if outcome is not None else 0)
        return outcome

    async def _admit(self, msg, state: BatchState) -> Admission | None:
        """Count the line against the batch's own budget (its creator's limits, a counter of its own)."""
        limiter = self._edge.limiter
        limits = RateLimits(rpm=state.rpm, tpm=state.tpm)
        if limiter is None or not limits.enabled:
            return Admission(None, "", limits, {}, None)
        try:
            return await limiter.admit(f"{state.caller}-batch", limits, stream=False)
        except RateLimited as err:
            await msg.nak(delay=float(err.retry_after or 1))
            return None

    async def _run_until_stopped(self, state: BatchState, line: BatchLine, delivery: int) -> Outcome:
        """Run the line; if its batch is cancelled or expires meanwhile, cancel it and report why."""
        stop = self._stops.setdefault(state.id, asyncio.Event())
        self._running[state.id] = self._running.get(state.id, 0) + 1
        run = asyncio.create_task(run_line(self._edge, state, line, delivery,
                                           patient=delivery < _PATIENCE))
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait((run, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(stopped)
            if not run.done():
                await cancel_and_wait(run)  # leaving the call broadcasts CancelRequest
            self._running[state.id] -= 1
            if not self._running[state.id]:
                del self._running[state.id]
                self._stops.pop(state.id, None)
        if not run.cancelled():
            return run.result()
        fresh, _ = await self._store.get(state.id)
        code, message = stop_reason(fresh, time.time()) or ("batch_cancelled", "the request was cancelled")
        return Outcome(SKIP, lines.skipped_line(line_id(state.id, line.custom_id), line.custom_id, code, message), 0)
