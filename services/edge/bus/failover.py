"""Failover of an in-flight request after its engine is lost: pure, no I/O.

The edge owns a request's failover because it is the one component that knows exactly what the
client has been sent. The scheduler acknowledges a message as soon as an engine accepts it and
keeps nothing about it afterwards; and a scheduler holding the message un-acked until the first
token could not tell, after its own death and JetStream's redelivery to another replica, whether
tokens had already reached the client.

``Delivered`` follows one request's events across attempts: it numbers deltas continuously (the
client sees ``seq`` 1, 2, 3... whichever engine produced them), keeps the text sent so far, and
adds the tokens of earlier attempts to the final usage. ``next_attempt`` builds the request to
re-publish when the engine running it is lost: the same request before any token was delivered
(a plain re-dispatch, still cacheable), else a continuation (the prompt, the text so far, the
remaining ``max_tokens``). Each attempt has its own id (``names.attempt_id``), so its reply
subject, ``Nats-Msg-Id`` and cancel never touch an earlier attempt that is still running
somewhere behind a partition.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import msgspec

from schemas import names
from schemas.errors import ErrorCode
from schemas.events import StreamEnd, StreamError, StreamEvent, TokenDelta, Usage
from schemas.inference import InferenceRequest

# Errors after which the request may go on elsewhere: the engine vanished (heartbeats stopped), or
# the engine itself gave up on it (shut down before it finished, a device fault).
MIGRATABLE = frozenset({ErrorCode.WORKER_LOST, ErrorCode.ENGINE_FAILED})


@dataclass
class Delivered:
    """What the client has been sent of one request, over all its attempts."""

    seq: int = 0
    tokens: int = 0
    parts: list[str] = field(default_factory=list)
    # Tokens delivered before the current attempt started (added to its usage).
    carried: int = 0
    attempt: int = 0
    # ``seq`` when the engine now followed started (its ``StreamStart``, or the attempt's start).
    mark: int = 0

    def restarted(self) -> bool:
        """Note a ``StreamStart``: whether deltas were delivered since the previous one of this attempt.

        A second engine starting after the first one streamed tokens (it accepted an offer the scheduler
        had given up on) cannot just be followed: the client would get those tokens twice.
        """
        streamed, self.mark = self.seq > self.mark, self.seq
        return streamed

    @property
    def text(self) -> str:
        """The answer so far, as the client has it."""
        return "".join(self.parts)

    def take(self, event: StreamEvent, request_id: str) -> StreamEvent:
        """Record ``event`` and return it as the client must see it (continuous ``seq``, whole usage)."""
        match event:
            case TokenDelta():
                self.seq += 1
                self.tokens += len(event.token_ids)
                self.parts.append(event.text)
                if self.attempt:
                    return msgspec.structs.replace(event, id=request_id, seq=self.seq)
            case StreamEnd() if self.attempt:
                usage = msgspec.structs.replace(event.usage,
                                                completion_tokens=event.usage.completion_tokens + self.carried)
                return msgspec.structs.replace(event, id=request_id, seq=self.seq + 1, usage=usage)
            case StreamError() if self.attempt:
                return msgspec.structs.replace(event, id=request_id, seq=self.seq + 1)
        return event


@dataclass(frozen=True)
class Impossible:
    """The request cannot go on elsewhere; ``message`` says why (sent to the client as ``worker_lost``)."""

    message: str


def next_attempt(original: InferenceRequest, delivered: Delivered, *, max_attempts: int,
                 now: float | None = None) -> InferenceRequest | StreamEnd | Impossible:
    """The request to publish after the current attempt's engine was lost.

    A ``StreamEnd`` when nothing is left to generate (the engine died right after the last token
    of its budget), ``Impossible`` when retries are spent or the deadline has passed.
    """
    attempt = delivered.attempt + 1
    if attempt > max_attempts:
        return Impossible(f"the request was lost with {attempt} engines; giving up")
    if original.deadline and (now if now is not None else time.time()) >= original.deadline:
        return Impossible("the engine was lost and the request's deadline has passed")
    remaining = original.sampling.max_tokens - delivered.tokens
    if remaining <= 0:
        return StreamEnd(id=original.id, seq=delivered.seq + 1, finish_reason="length",
                         usage=Usage(prompt_tokens=0, completion_tokens=delivered.tokens))
    sampling = msgspec.structs.replace(original.sampling, max_tokens=remaining)
    bus_id = names.attempt_id(original.id, attempt)
    reply_to = original.reply_to[:original.reply_to.rfind(".") + 1] + bus_id
    return msgspec.structs.replace(original, id=bus_id, reply_to=reply_to, attempt=attempt,
                                   continuation=delivered.text, sampling=sampling, cache_key=None)


def begin(delivered: Delivered, attempt: int) -> None:
    """Start counting a new attempt: what was delivered so far is carried into its usage."""
    delivered.attempt = attempt
    delivered.carried = delivered.tokens
    delivered.mark = delivered.seq
