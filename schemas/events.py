"""Token-stream events, sent by an engine (or a scheduler) to a request's ``reply_to``.

A stream is ``StreamStart``, then ``TokenDelta``s with ``seq`` 1, 2, 3..., then exactly one
terminal event: ``StreamEnd`` or ``StreamError``. Each is a JSON object tagged by ``type``.

Every event carries the ``dispatch`` number of the request it answers (``InferenceRequest.dispatch``,
omitted when 0): if an engine the scheduler gave up on accepts late, its events are told apart from
the current engine's by that number alone, and the producer drops them.
"""

from __future__ import annotations

from typing import Union

import msgspec


class Usage(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Real token counts: prompt tokens as fed to the model, completion tokens as generated.

    ``cached_tokens`` of the prompt tokens were not computed again: the engine reused their KV
    cache from an earlier request with the same prefix (OpenAI's ``prompt_tokens_details``).
    """

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


class StreamStart(msgspec.Struct, tag="start", tag_field="type", kw_only=True, omit_defaults=True):
    """The engine ``worker`` accepted request ``id`` and is generating.

    An engine publishes it *before* its ``DispatchReply(accepted=True)``, on the same connection,
    so the producer learns which engine runs the request no later than the scheduler learns it was
    accepted: an engine that dies right after accepting is found by its missed heartbeats rather
    than by the request's deadline. A cached answer starts with ``worker`` ``"cache"``.
    ``dispatch`` (every event has it) is the request's ``dispatch`` number, echoed.
    """

    id: str
    worker: str
    model: str
    prompt_tokens: int = 0
    dispatch: int = 0


class TopLogprob(msgspec.Struct, kw_only=True):
    """One likely token at a position: its id, its text (the token decoded alone) and log-probability."""

    token_id: int
    token: str
    logprob: float


class TokenLogprob(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A generated token's log-probability and, if asked for, the most likely alternatives (best first)."""

    token_id: int
    token: str
    logprob: float
    top: list[TopLogprob] = []


class TokenDelta(msgspec.Struct, tag="delta", tag_field="type", kw_only=True, omit_defaults=True):
    """New text for choice ``index``; ``seq`` counts deltas from 1 so gaps are detectable.

    ``logprobs`` (only when the request asked for them, else omitted) holds one entry per
    ``token_ids`` entry, in the same order.
    """

    id: str
    seq: int
    text: str
    token_ids: list[int] = []
    index: int = 0
    logprobs: list[TokenLogprob] = []
    dispatch: int = 0


class StreamEnd(msgspec.Struct, tag="end", tag_field="type", kw_only=True, omit_defaults=True):
    """The request finished; ``finish_reason`` is ``stop`` or ``length``."""

    id: str
    seq: int
    finish_reason: str
    usage: Usage
    index: int = 0
    cached: bool = False
    dispatch: int = 0


class StreamError(msgspec.Struct, tag="error", tag_field="type", kw_only=True, omit_defaults=True):
    """The request failed with ``code`` from ``schemas.errors.ErrorCode``."""

    id: str
    code: str
    message: str
    seq: int = 0
    param: str | None = None
    dispatch: int = 0


StreamEvent = Union[StreamStart, TokenDelta, StreamEnd, StreamError]

_event_decoder = msgspec.json.Decoder(StreamEvent)
_encoder = msgspec.json.Encoder()


def decode_event(data: bytes) -> StreamEvent:
    """Decode one stream event (raises ``msgspec.ValidationError`` on a malformed one)."""
    return _event_decoder.decode(data)


def encode(message: msgspec.Struct) -> bytes:
    """Encode any wire struct as JSON, the bus format."""
    return _encoder.encode(message)
