"""The scheduler's side of the prompt cache (KV ``llm_prompt_cache``): look a key up, replay a hit.

Entries are written by the engine that generated them (see ``services.engine.response_cache``);
their TTL and the bucket's byte bound are the bucket's own, set in ``infra/nats/jetstream.toml``
and changed on a running cluster with ``./cy infra apply --update``. A lookup that fails for
any bus reason is a miss: the request is generated, never lost.
"""

from __future__ import annotations

import logging

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.kv import KeyValue

from schemas.cache import CachedResponse
from schemas.events import StreamEnd, StreamStart, TokenDelta, encode
from schemas.inference import InferenceRequest

log = logging.getLogger(__name__)

CACHE_WORKER = "cache"  # the ``worker`` of a replayed stream's StreamStart
_decoder = msgspec.json.Decoder(CachedResponse)
_LOOKUP_ERRORS = (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.APIError,
                  nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError,
                  nats.errors.ConnectionReconnectingError, nats.errors.StaleConnectionError)


class PromptCache:
    """Reads entries of ``kv`` and replays them on a request's reply subject over ``nc``."""

    def __init__(self, nc: Client, kv: KeyValue) -> None:
        self._nc = nc
        self._kv = kv

    async def lookup(self, key: str) -> CachedResponse | None:
        """The stored response under ``key``, or None on a miss (absent, expired, unreadable, bus trouble)."""
        try:
            entry = await self._kv.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):  # absent, deleted or expired
            return None
        except _LOOKUP_ERRORS as exc:
            log.warning("prompt cache lookup failed (treated as a miss): %s", exc)
            return None
        try:
            return _decoder.decode(entry.value or b"")
        except msgspec.DecodeError as exc:
            log.warning("ignoring malformed prompt cache entry %s: %s", key, exc)
            return None

    async def replay(self, req: InferenceRequest, cached: CachedResponse) -> None:
        """Send ``cached`` to ``req.reply_to`` as the same event stream an engine sends, ending ``cached=True``."""
        publish, reply_to = self._nc.publish, req.reply_to
        await publish(reply_to, encode(StreamStart(id=req.id, worker=CACHE_WORKER, model=cached.model,
                                                   prompt_tokens=cached.usage.prompt_tokens)))
        seq = 0
        for delta in cached.deltas:
            seq += 1
            await publish(reply_to, encode(TokenDelta(id=req.id, seq=seq, text=delta.text,
                                                      token_ids=delta.token_ids)))
        await publish(reply_to, encode(StreamEnd(id=req.id, seq=seq + 1, finish_reason=cached.finish_reason,
                                                 usage=cached.usage, cached=True)))
