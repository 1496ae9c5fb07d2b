"""The bus side of batches: state and line outcomes in KV ``llm_batches``, work on stream ``LLM_BATCH``.

A line's outcome is written once: the publish to its key carries
``Nats-Expected-Last-Subject-Sequence: 0`` over the subjects of all three kinds of that line
(``Nats-Expected-Last-Subject-Sequence-Subject``), so a second outcome of the same line, of any
kind, is refused by the server (10071). Live counts are the number of keys of each kind (counted by
the server: ``count``), so they are exact whatever runner died where.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from schemas import names
from schemas.batch import OUTCOMES, BatchLine, BatchOutputLine, BatchStart, BatchState
from schemas.errors import BusError, ErrorCode
from services.common import js_publish
from services.common.buckets import kv_values

_WRONG_LAST_SEQUENCE = 10071
_CAS_ATTEMPTS = 20
_COUNTER_IDLE = 30.0  # seconds before the server drops a counting consumer a crashed edge left behind
_PUBLISH_CONCURRENCY = 64
_state_decoder = msgspec.json.Decoder(BatchState)
_encode = msgspec.json.Encoder().encode
_UNAVAILABLE = (nats.errors.Error, TimeoutError)


@contextlib.contextmanager
def bus_call(what: str):
    """Turn a bus failure while doing ``what`` into a 503 ``unavailable`` error."""
    try:
        yield
    except BusError:
        raise
    except _UNAVAILABLE as exc:
        raise BusError(ErrorCode.UNAVAILABLE, f"NATS did not answer while {what} ({type(exc).__name__}); "
                       "retry shortly") from None


def not_found(batch_id: str) -> BusError:
    """The 404 of an unknown batch."""
    return BusError(ErrorCode.NOT_FOUND, f"no batch with id '{batch_id}'", param="batch_id")


class BatchStore:
    """Batch state, outcomes and work on the bus; one per edge, shared by its routes and runner."""

    def __init__(self, nc: Client, *, publish_timeout: float, publish_window: float = 0.0) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._timeout = publish_timeout
        self._window = publish_window
        self._kv = None

    async def bucket(self):
        """KV ``llm_batches`` (a 503 naming ``./cy infra apply`` if it is not provisioned)."""
        if self._kv is None:
            with bus_call("binding the batch bucket"):
                try:
                    self._kv = await self._js.key_value(names.BATCHES_BUCKET)
                except nats.js.errors.BucketNotFoundError:
                    raise BusError(ErrorCode.UNAVAILABLE, f"KV bucket {names.BATCHES_BUCKET} does not exist on "
                                   "this NATS server; run ./cy infra apply against it") from None
        return self._kv

    # --- state ---

    async def create(self, state: BatchState) -> None:
        """Record a new batch."""
        kv = await self.bucket()
        with bus_call("creating the batch"):
            await kv.create(state.id, _encode(state))

    async def forget(self, batch_id: str) -> None:
        """Remove a batch's state (one that could not be queued); best effort."""
        kv = await self.bucket()
        with contextlib.suppress(nats.errors.Error):
            await kv.delete(batch_id)

    async def get(self, batch_id: str) -> tuple[BatchState, int]:
        """A batch's state and KV revision; 404 if there is none."""
        try:
            names.token(batch_id)
        except ValueError:
            raise not_found(batch_id) from None
        kv = await self.bucket()
        with bus_call("reading the batch"):
            try:
                entry = await kv.get(batch_id)
            except nats.js.errors.KeyNotFoundError:
                raise not_found(batch_id) from None
        return _state_decoder.decode(entry.value or b""), entry.revision

    async def change(self, batch_id: str, edit: Callable[[BatchState], BatchState | None]) -> BatchState:
        """Apply ``edit`` by compare-and-set (re-read and re-applied on a race); ``None`` from it changes nothing."""
        kv = await self.bucket()
        for _ in range(_CAS_ATTEMPTS):
            state, revision = await self.get(batch_id)
            new = edit(state)
            if new is None:
                return state
            with bus_call("updating the batch"):
                try:
                    await kv.update(batch_id, _encode(new), last=revision)
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue
            return new
        raise BusError(ErrorCode.UNAVAILABLE, f"batch '{batch_id}' kept changing; retry")

    async def states(self) -> list[BatchState]:
        """Every batch (the state keys only: one token, no outcomes)."""
        kv = await self.bucket()
        with bus_call("listing batches"):
            values = await kv_values(kv, timeout=self._timeout, keys="*")
        return [_state_decoder.decode(v) for v in values.values()]

    # --- outcomes ---

    async def record(self, batch_id: str, outcome: str, index: int, line: BatchOutputLine) -> bool:
        """Write line ``index``'s outcome unless it has one (of any kind); whether this call wrote it."""
        subject = names.kv_key_subject(names.BATCHES_BUCKET, names.batch_outcome_key(batch_id, outcome, index))
        headers = {"Nats-Expected-Last-Subject-Sequence": "0",
                   "Nats-Expected-Last-Subject-Sequence-Subject": names.batch_line_keys(batch_id, index)}
        try:
            await self._js.publish(subject, _encode(line), timeout=self._timeout, headers=headers)
        except nats.js.errors.APIError as exc:
            if exc.err_code == _WRONG_LAST_SEQUENCE:
                return False
            raise
        return True

    async def recorded(self, batch_id: str, index: int) -> bool:
        """Whether line ``index`` already has an outcome."""
        info = await self._js.stream_info(names.kv_stream(names.BATCHES_BUCKET),
                                          subjects_filter=names.batch_line_keys(batch_id, index))
        return bool(info.state.subjects)

    async def count(self, batch_id: str, outcome: str = "*") -> int:
        """How many lines have an outcome of kind ``outcome`` (``*``: any).

        The ``num_pending`` of a short-lived consumer filtered on those keys: the server counts,
        and the answer is one number however many lines the batch has (a subjects listing would
        grow with the batch, and every line asks whether it was the last).
        """
        stream = names.kv_stream(names.BATCHES_BUCKET)
        info = await self._js.add_consumer(stream, ConsumerConfig(
            name=f"batch-count-{uuid.uuid4().hex}", filter_subject=names.batch_outcome_keys(batch_id, outcome),
            deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, mem_storage=True,
            inactive_threshold=_COUNTER_IDLE))
        with contextlib.suppress(nats.errors.Error):
            await self._js.delete_consumer(stream, info.name)
        return info.num_pending or 0

    async def counts(self, batch_id: str) -> dict[str, int]:
        """How many lines have each kind of outcome (``ok``, ``err``, ``skip``)."""
        kinds = await asyncio.gather(*(self.count(batch_id, kind) for kind in OUTCOMES))
        return dict(zip(OUTCOMES, kinds, strict=True))

    async def outcomes(self, batch_id: str) -> dict[str, list[tuple[int, bytes]]]:
        """Every recorded outcome by kind, as (line index, output line JSON), in line order."""
        kv = await self.bucket()
        values = await kv_values(kv, timeout=self._timeout, keys=f"{names.token(batch_id)}.*.*")
        out: dict[str, list[tuple[int, bytes]]] = {kind: [] for kind in OUTCOMES}
        for key, value in values.items():
            _, kind, index = key.split(".")
            out[kind].append((int(index), value))
        for rows in out.values():
            rows.sort()
        return out

    async def purge_outcomes(self, batch_id: str) -> None:
        """Remove every line outcome of a finished batch (its result files hold them); best effort."""
        with contextlib.suppress(nats.errors.Error):
            await self._js.purge_stream(names.kv_stream(names.BATCHES_BUCKET),
                                        subject=names.batch_outcome_keys(batch_id))

    # --- work ---

    async def publish_start(self, batch_id: str) -> None:
        """Queue the start of a batch (once: ``Nats-Msg-Id`` = ``<batch>:start``)."""
        with bus_call("queueing the batch"):
            try:
                await js_publish.publish(self._js, names.BATCH_START, _encode(BatchStart(batch_id=batch_id)),
                                         msg_id=f"{batch_id}:start", timeout=self._timeout, window=self._window,
                                         nc=self._nc)
            except nats.js.errors.NoStreamResponseError:
                raise BusError(ErrorCode.UNAVAILABLE, f"stream {names.BATCH_STREAM} does not exist or does not "
                               "answer; run ./cy infra apply") from None

    async def publish_lines(self, lines: list[BatchLine]) -> None:
        """Queue every line (``Nats-Msg-Id`` from batch id and ``custom_id``: a re-publication stores none twice)."""
        gate = asyncio.Semaphore(_PUBLISH_CONCURRENCY)

        async def one(line: BatchLine) -> None:
            async with gate:
                await js_publish.publish(self._js, names.batch_lines(line.batch_id), _encode(line),
                                         msg_id=names.batch_line_msg_id(line.batch_id, line.custom_id),
                                         timeout=self._timeout, window=self._window, nc=self._nc)

        await asyncio.gather(*(one(line) for line in lines))
