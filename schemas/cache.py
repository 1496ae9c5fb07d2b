"""The prompt cache's stored value: one complete response, as KV ``llm_prompt_cache`` holds it.

Written by the engine that generated the response (it saw every delta), read by the scheduler
to replay a hit as the same event stream: ``StreamStart``, one ``TokenDelta`` per stored delta
(joined into one for a request that is not streamed), ``StreamEnd`` with ``cached=True``.
"""

from __future__ import annotations

import msgspec

from schemas.events import Usage


class CachedDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One ``TokenDelta`` of the original stream, without its request id and sequence number."""

    text: str
    token_ids: list[int] = []


class CachedResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A finished, successful response: its deltas in order, why it ended and its real usage."""

    model: str
    deltas: list[CachedDelta]
    finish_reason: str
    usage: Usage
    created: float = 0.0
