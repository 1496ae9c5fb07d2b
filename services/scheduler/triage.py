"""What to do with one message taken from the queue, decided without I/O.

``classify`` turns the raw message into a verdict: malformed, already accepted, being
dispatched right now, cancelled, past its deadline, or to be dispatched. ``refusal_is_final``
tells an engine's request-level refusal (the client must hear about it) from an engine-level
one (another engine may take the request).
"""

from __future__ import annotations

import re
from collections.abc import Container
from dataclasses import dataclass

import msgspec

from schemas.errors import ErrorCode
from schemas.inference import DispatchReply, InferenceRequest

_request_decoder = msgspec.json.Decoder(InferenceRequest)

# A reply subject the scheduler may publish to: dot-separated tokens, no wildcards or spaces.
_SUBJECT_RE = re.compile(r"^[^.\s*>]+(\.[^.\s*>]+)*\Z")

# Refusals about the request itself: retrying on another engine would only fail again.
# Refusals about the request itself: it would fail on any engine. ``unsupported`` is not one of them:
# engines differ in what they support (a DoRA adapter or logprobs on one engine, not on another),
# so the scheduler offers the request to the next engine and reports ``unsupported`` only when
# none of the engines tried would take it.
_FINAL_REFUSALS = frozenset({ErrorCode.INVALID_REQUEST, ErrorCode.CONTEXT_LENGTH_EXCEEDED})


class _Envelope(msgspec.Struct):
    """The two fields needed to answer a request that failed to decode, read leniently."""

    id: str = ""
    reply_to: str = ""


@dataclass(frozen=True)
class Malformed:
    """Not a valid ``InferenceRequest``; answer on ``reply_to`` if one could be read, then drop it."""

    request_id: str
    reply_to: str | None
    reason: str


@dataclass(frozen=True)
class Duplicate:
    """An engine already accepted this request id (a redelivery, or a producer's retry)."""

    request: InferenceRequest


@dataclass(frozen=True)
class InFlight:
    """This scheduler is dispatching this request id right now (a redelivery raced the first copy)."""

    request: InferenceRequest


@dataclass(frozen=True)
class Cancelled:
    """The request was cancelled while it waited in the queue."""

    request: InferenceRequest


@dataclass(frozen=True)
class Expired:
    """The request's deadline passed before it could be dispatched."""

    request: InferenceRequest


@dataclass(frozen=True)
class Dispatchable:
    """A valid, live request to hand to an engine."""

    request: InferenceRequest


Verdict = Malformed | Duplicate | InFlight | Cancelled | Expired | Dispatchable


def valid_subject(subject: str) -> bool:
    """Whether ``subject`` is a concrete subject a message can be published to."""
    return bool(_SUBJECT_RE.match(subject))


def _malformed(data: bytes, reason: str) -> Malformed:
    try:
        env = msgspec.json.decode(data, type=_Envelope)
    except msgspec.DecodeError:  # not even a JSON object with string id/reply_to
        return Malformed("", None, reason)
    reply_to = env.reply_to if valid_subject(env.reply_to) else None
    return Malformed(env.id, reply_to, reason)


def classify(data: bytes, *, now: float, cancelled: Container[str], accepted: Container[str],
             dispatching: Container[str]) -> Verdict:
    """Decide the fate of one queued message from its bytes and what the scheduler remembers.

    ``now`` is Unix time in seconds (``deadline`` is wall-clock, set by the producer).
    """
    try:
        req = _request_decoder.decode(data)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        return _malformed(data, f"not a valid InferenceRequest: {exc}")
    if not req.id or not req.model:
        return _malformed(data, "an InferenceRequest needs a non-empty 'id' and 'model'")
    if not valid_subject(req.reply_to):
        return Malformed(req.id, None, f"'reply_to' is not a subject: {req.reply_to!r}")
    if req.id in accepted:
        return Duplicate(req)
    if req.id in dispatching:
        return InFlight(req)
    if req.id in cancelled:
        return Cancelled(req)
    if req.deadline and now >= req.deadline:
        return Expired(req)
    return Dispatchable(req)


def retry_delay(deliveries: int, base: float, cap: float) -> float:
    """How long a message nobody could take waits before it is offered again.

    ``deliveries`` counts how often JetStream has handed it out (1 the first time): the delay
    doubles each time, so a backlog for a saturated model is not re-read at full speed.
    """
    return min(cap, base * 2 ** min(max(deliveries, 1) - 1, 16))


def refusal_is_final(reply: DispatchReply) -> bool:
    """Whether a not-accepted reply is about the request itself (report it) rather than the engine (retry)."""
    return not reply.accepted and reply.code in _FINAL_REFUSALS


# Offers of one delivery are numbered below this; more engines than this are never tried for one.
_OFFERS_PER_DELIVERY = 1000


def dispatch_number(deliveries: int, offered: int) -> int:
    """The ``InferenceRequest.dispatch`` of the ``offered``-th engine (0 first) tried for a message
    JetStream has delivered ``deliveries`` times (1 the first time).

    Later offers always get larger numbers, on any replica: a redelivery counts on from the
    previous delivery's offers, so a producer can tell the engine of the newest offer from one
    that accepted an older offer late.
    """
    return (max(deliveries, 1) - 1) * _OFFERS_PER_DELIVERY + min(offered, _OFFERS_PER_DELIVERY - 1)
