"""Running one batch line as an ordinary inference request on the low-priority lane.

The line's body goes through the same validation and translation as the HTTP endpoint it names
(``ANSWERS``, one entry per endpoint); the request gets a bus id derived from the batch id, the line's
``custom_id`` and the delivery (``names.batch_request_id``), the low lane, and a deadline no later
than the batch's expiry. Its answer is built by the endpoint's own JSON body builder, so an output
line holds exactly what the endpoint would have answered over HTTP.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec

from schemas import names
from schemas.batch import ERR, OK, SKIP, BatchLine, BatchOutputLine, BatchState
from schemas.errors import BusError, ErrorCode
from services.common.model_ref import adapter_model_id
from services.edge.batch import lines
from services.edge.bus.pump import pump
from services.edge.errors import error_json, status_for
from schemas.inference import InferenceRequest
from services.edge.http import json_depth
from services.edge.http.sse import JsonWriter
from services.edge.openai import completions, responses, responses_translate
from services.edge.openai.responses_body import ResponseDraft
from services.edge.openai.responses_stream import ResponseJsonWriter
from services.edge.openai.choices import ChoiceCalls
from services.edge.openai.translate import choice_requests
from services.edge.state import Edge

log = logging.getLogger(__name__)

LOW_PRIORITY = -1  # names.lane_for_priority: < 0 is the low lane
# Failures that say nothing about the line (no engine now, a full queue, the bus away): the line
# is taken again later instead of being reported as failed.
TRANSIENT = frozenset({ErrorCode.NO_WORKER, ErrorCode.QUEUE_FULL, ErrorCode.UNAVAILABLE, ErrorCode.ENGINE_BUSY})
# Failures retried only for a line's first few deliveries: they may pass (an engine not heard from
# yet, one that crashed with no other to fail over to) or may be the line's own doing.
RETRIED_A_FEW_TIMES = frozenset({ErrorCode.MODEL_NOT_FOUND, ErrorCode.WORKER_LOST, ErrorCode.ENGINE_FAILED})


EXPIRED = "batch_expired"
EXPIRED_MESSAGE = "the batch's completion window ended before this request finished"
# A request whose deadline (the batch's expiry) passed times out on the event loop's clock: up to
# this much earlier than the wall clock the expiry is written in.
_CLOCK_SLACK = 1.0


class Transient(Exception):
    """The line could not run now for a reason that is not its own; run it again later."""

    def __init__(self, error: BusError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a line ended with: its kind (``ok``/``err``), its output line and the tokens it used."""

    kind: str
    line: BatchOutputLine
    tokens: int


def line_id(batch_id: str, custom_id: str) -> str:
    """The ``id`` of a line in the output and error files (the same whichever delivery answered it)."""
    digest = hashlib.sha256(batch_id.encode() + b"\0" + custom_id.encode()).hexdigest()[:24]
    return f"batch_req_{digest}"


async def run_line(edge: Edge, state: BatchState, line: BatchLine, delivery: int, *,
                   patient: bool = False) -> Outcome:
    """Run ``line`` (its ``delivery``-th time) and return its outcome; raises ``Transient`` to be retried.

    With ``patient``, ``RETRIED_A_FEW_TIMES`` failures are transient too: a runner that just
    started has not heard every engine's heartbeat, and engines restart; the runner stops being
    patient after a few deliveries, and the line then fails as the HTTP endpoint would.
    """
    request_id = names.batch_request_id(state.id, line.custom_id, delivery)
    out_id = line_id(state.id, line.custom_id)
    try:
        body, tokens = await _answer(edge, state, line, request_id)
    except BusError as err:
        if err.code == ErrorCode.TIMEOUT and time.time() >= state.expires_at - _CLOCK_SLACK:
            return Outcome(SKIP, lines.skipped_line(out_id, line.custom_id, EXPIRED, EXPIRED_MESSAGE), 0)
        if err.code in TRANSIENT or (patient and err.code in RETRIED_A_FEW_TIMES):
            raise Transient(err) from None
        return Outcome(ERR, lines.failed_line(out_id, line.custom_id, request_id, status_for(err.code),
                                              error_json(err)), 0)
    return Outcome(OK, lines.ok_line(out_id, line.custom_id, request_id, body), tokens)


async def _answer(edge: Edge, state: BatchState, line: BatchLine, request_id: str) -> tuple[bytes, int]:
    """The line's endpoint's JSON answer to its body, and the tokens it used."""
    return await ANSWERS[line.url](edge, state, bytes(line.body), request_id)


def _on_low_lane(req: InferenceRequest, state: BatchState, request_id: str, edge: Edge) -> InferenceRequest:
    """``req`` under the line's bus id, on the low lane, due no later than the batch's expiry."""
    deadline = min(req.deadline, float(state.expires_at))
    if deadline <= time.time():
        raise BusError(ErrorCode.TIMEOUT, "the batch's completion window ended before this request could run")
    return msgspec.structs.replace(req, id=request_id, reply_to=edge.router.reply_to(request_id),
                                   priority=LOW_PRIORITY, deadline=deadline)


async def _run(edge: Edge, req: InferenceRequest, n: int, writer) -> int:
    """Publish ``req`` (``n`` choices) and pump its events into ``writer``; the tokens it used."""
    timeout = req.deadline - req.created
    if n > 1:
        call = ChoiceCalls(edge.publisher, choice_requests(req, n, edge.router.reply_to), timeout)
    else:
        call = edge.publisher.call(req, timeout)
    async with call as source:
        await pump(source, writer)
    usage = source.usage
    return usage.total_tokens if usage is not None else 0


def _completions(endpoint: completions.Endpoint) -> Answer:
    """How a line of a chat or legacy completions batch is answered: that endpoint's own JSON body."""
    async def answer(edge: Edge, state: BatchState, raw: bytes, request_id: str) -> tuple[bytes, int]:
        parsed = completions.parse_body(raw, endpoint, edge.config)
        req = _on_low_lane(completions.build_request(edge, parsed, endpoint.id_prefix), state, request_id, edge)
        writer = JsonWriter(endpoint.body, request_id=request_id, created=int(req.created),
                            model=adapter_model_id(req.model, req.adapter), width=parsed.n,
                            logprobs=req.sampling.logprobs is not None)
        tokens = await _run(edge, req, parsed.n, writer)
        return writer.response.body, tokens
    return answer


async def _response(edge: Edge, state: BatchState, raw: bytes, request_id: str) -> tuple[bytes, int]:
    """A ``/v1/responses`` line: the response object (stored, unless ``store`` is false, for its creator)."""
    json_depth.check_depth(raw, edge.config.max_json_depth)
    parsed, req = await responses.prepare(edge, responses_translate.decode_body(raw), state.response_owner)
    req = _on_low_lane(req, state, request_id, edge)
    draft = ResponseDraft(response_id=request_id, created=int(req.created),
                          model=adapter_model_id(req.model, req.adapter), shown=parsed.shown,
                          read_calls=parsed.parsed.read_calls)
    writer = ResponseJsonWriter(draft)
    tokens = await _run(edge, req, 1, writer)
    if parsed.store:
        try:
            await responses.store_of(edge).put(responses.stored(draft, writer.body, parsed, state.response_owner))
        except BusError as err:  # the answer is generated: keep it in the output; only a retrieval will miss it
            log.warning("batch %s: response %s not stored: %s", state.id, request_id, err.message)
    return writer.response.body, tokens


Answer = Callable[[Edge, BatchState, bytes, str], Awaitable[tuple[bytes, int]]]
# How a line of each endpoint a batch may call (``lines.ENDPOINTS``) is answered.
ANSWERS: dict[str, Answer] = {
    "/v1/chat/completions": _completions(completions.CHAT),
    "/v1/completions": _completions(completions.COMPLETION),
    "/v1/responses": _response,
}
