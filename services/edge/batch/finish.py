"""Ending a batch: its output and error files assembled from the recorded outcomes, its state final.

Run after every recorded line (and on a redelivered line whose outcome was already there, so a
runner that died between recording the last line and finishing leaves it to the next one). It
does nothing until every line has an outcome. Files get ids derived from the batch id, so two
runners finishing the same batch write the same objects; the state changes once (compare-and-set).
Once the state is final, the line outcomes are purged from KV: the result files hold them, and a
batch leaves only its state behind. A runner that read fewer outcomes than lines was beaten to it
by one that finished and purged, and writes no file.
"""

from __future__ import annotations

import hashlib
import io
import time

import msgspec

from schemas.batch import (CANCELLED, CANCELLING, COMPLETED, ERR, EXPIRED, OK, SKIP, TERMINAL, BatchOutputLine,
                           BatchState)
from services.common.artifacts import FileMeta
from services.edge.batch.store import BatchStore
from services.edge.training.store import TrainingStore

OUTPUT_PURPOSE = "batch_output"
_output_line = msgspec.json.Decoder(BatchOutputLine)


def result_file_id(batch_id: str, kind: str) -> str:
    """The id of a batch's ``output`` or ``error`` file (the same on every runner)."""
    return f"file-{hashlib.sha256(f'{batch_id}/{kind}'.encode()).hexdigest()[:24]}"


def final_status(state: BatchState, skipped: list[bytes]) -> str:
    """``cancelled`` if it was cancelled, ``expired`` if its window ended with lines unrun, else ``completed``."""
    if state.status in (CANCELLING, CANCELLED):
        return CANCELLED
    errors = [_output_line.decode(raw).error for raw in skipped]
    if any(error is not None and error.code == "batch_expired" for error in errors):
        return EXPIRED
    return COMPLETED


async def finish_batch(store: BatchStore, files: TrainingStore, batch_id: str, total: int) -> BatchState | None:
    """Finish ``batch_id`` (of ``total`` lines) if every line has an outcome; its final state, or ``None``."""
    if await store.count(batch_id) < total:
        return None
    state, _ = await store.get(batch_id)
    if state.status in TERMINAL:
        return state
    rows = await store.outcomes(batch_id)
    if sum(map(len, rows.values())) < total:  # another runner finished it and purged the outcomes meanwhile
        return (await store.get(batch_id))[0]
    now = int(time.time())
    output = await _put(files, state, "output", [raw for _, raw in rows[OK]], now)
    failed = [raw for _, raw in sorted(rows[ERR] + rows[SKIP])]
    errors = await _put(files, state, "error", failed, now)
    skipped = [raw for _, raw in rows[SKIP]]

    def finished(s: BatchState) -> BatchState | None:
        if s.status in TERMINAL:
            return None
        status = final_status(s, skipped)
        stamp = {CANCELLED: "cancelled_at", EXPIRED: "expired_at", COMPLETED: "completed_at"}[status]
        return msgspec.structs.replace(s, status=status, finalizing_at=now, output_file_id=output,
                                       error_file_id=errors, completed=len(rows[OK]), failed=len(failed),
                                       **{stamp: now})

    final = await store.change(batch_id, finished)
    if final.status in TERMINAL:
        await store.purge_outcomes(batch_id)
    return final


async def _put(files: TrainingStore, state: BatchState, kind: str, rows: list[bytes], now: int) -> str | None:
    """Store one result file (JSONL of ``rows``) as an uploaded file of purpose ``batch_output``; its id."""
    if not rows:
        return None
    data = b"".join(raw + b"\n" for raw in rows)
    meta = FileMeta(id=result_file_id(state.id, kind), filename=f"{state.id}_{kind}.jsonl", purpose=OUTPUT_PURPOSE,
                    bytes=len(data), created_at=now, owner=state.owner)
    await files.put_file(meta, io.BytesIO(data))
    return meta.id
