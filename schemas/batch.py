"""Batch messages: the work on stream ``LLM_BATCH`` and the values in KV ``llm_batches``.

Protocol (``docs/batch.md`` argues it):

1. ``POST /v1/batches`` creates the ``BatchState`` (status ``validating``) under key ``<batch id>``
   and publishes ``BatchStart`` to ``names.BATCH_START`` (``Nats-Msg-Id`` = ``<batch id>:start``).
2. A batch runner (every edge runs one, sharing the durable consumer ``batch_runners``) takes the
   start, publishes one ``BatchLine`` per input line to ``names.batch_lines(batch)`` (``Nats-Msg-Id``
   = ``<batch id>:<custom_id digest>``: a redelivered start publishes nothing twice) and moves the
   state to ``in_progress``.
3. A runner takes a line, runs it as an ordinary inference request on the low lane and records its
   outcome once: a ``BatchOutputLine`` under ``<batch>.ok.<index>``, ``<batch>.err.<index>`` or
   ``<batch>.skip.<index>`` (cancelled or expired), created only if no key of that line exists yet.
   Then it acks. Counts are the number of keys per kind; the runner that records the last line
   assembles the output and error files and finishes the state (compare-and-set).
"""

from __future__ import annotations

import msgspec

# OpenAI's batch statuses.
VALIDATING = "validating"
FAILED = "failed"
IN_PROGRESS = "in_progress"
FINALIZING = "finalizing"
COMPLETED = "completed"
EXPIRED = "expired"
CANCELLING = "cancelling"
CANCELLED = "cancelled"
TERMINAL = frozenset({FAILED, COMPLETED, EXPIRED, CANCELLED})

# The kinds of a line's outcome (a token of its KV key).
OK = "ok"
ERR = "err"
SKIP = "skip"
OUTCOMES = (OK, ERR, SKIP)


class BatchStart(msgspec.Struct, kw_only=True):
    """Publish every line of batch ``batch_id`` (work on ``names.BATCH_START``)."""

    batch_id: str


class BatchLine(msgspec.Struct, kw_only=True):
    """One request of a batch: line ``index`` (0-based) of its input file, ``body`` as uploaded."""

    batch_id: str
    index: int
    custom_id: str
    url: str
    body: msgspec.Raw


class BatchError(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An entry of a batch's ``errors.data`` (a refused input line), or a line's ``error``."""

    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchResponse(msgspec.Struct, kw_only=True):
    """The HTTP answer a line got: status, the request's id and the OpenAI body (a completion or an error)."""

    status_code: int
    request_id: str
    body: msgspec.Raw


class BatchOutputLine(msgspec.Struct, kw_only=True):
    """One line of a batch's output or error file, exactly OpenAI's ``{id, custom_id, response, error}``."""

    id: str
    custom_id: str
    response: BatchResponse | None = None
    error: BatchError | None = None


class BatchState(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A batch (OpenAI's batch object, less the live counts) plus what the runners need.

    ``caller``, ``rpm`` and ``tpm`` are the rate budgets of whoever created it: its lines spend
    them under the caller's own batch counter, never the caller's interactive one.
    """

    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    created_at: int
    expires_at: int
    total: int
    metadata: dict[str, str] | None = None
    owner: str | None = None
    caller: str = ""
    response_owner: str = ""  # whose stored responses its /v1/responses lines continue and create
    rpm: int = 0
    tpm: int = 0
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[BatchError] | None = None
    completed: int = 0  # final counts, set when the batch ends (live ones are counted from the keys)
    failed: int = 0
