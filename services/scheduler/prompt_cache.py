"""The scheduler's side of the prompt cache (KV ``llm_prompt_cache``): look a key up, replay a hit.

Lookups (and the memory mirror that saves most of them) are ``services.common.prompt_cache``'s,
shared with the edge; what is the scheduler's own is replaying a hit on the request's reply
subject as the same event stream an engine sends.
"""

from __future__ import annotations

from schemas.cache import CachedResponse
from schemas.events import StreamEnd, StreamStart, TokenDelta, encode
from schemas.inference import InferenceRequest
from services.common.prompt_cache import PromptCacheReader

CACHE_WORKER = "cache"  # the ``worker`` of a replayed stream's StreamStart


class PromptCache(PromptCacheReader):
    """Reads entries of ``kv`` (through the mirror when there is one) and replays them over ``nc``.

    ``async with PromptCache(...)`` starts and stops the mirror's watch and checks.
    """

    async def replay(self, req: InferenceRequest, cached: CachedResponse) -> None:
        """Send ``cached`` to ``req.reply_to`` as the same event stream an engine sends, ending ``cached=True``.

        A streamed request gets the original deltas one by one. One that is not streamed
        (``stream`` false) gets them joined into one delta: its producer gathers the text into one
        body anyway, and one event instead of one per token is most of what a hit costs both ends.
        """
        publish, reply_to = self._nc.publish, req.reply_to
        await publish(reply_to, encode(StreamStart(id=req.id, worker=CACHE_WORKER, model=cached.model,
                                                   prompt_tokens=cached.usage.prompt_tokens)))
        seq = 0
        if not req.stream and len(cached.deltas) > 1:
            seq = 1
            await publish(reply_to, encode(TokenDelta(
                id=req.id, seq=seq, text="".join(d.text for d in cached.deltas),
                token_ids=[t for d in cached.deltas for t in d.token_ids])))
        else:
            for delta in cached.deltas:
                seq += 1
                await publish(reply_to, encode(TokenDelta(id=req.id, seq=seq, text=delta.text,
                                                          token_ids=delta.token_ids)))
        await publish(reply_to, encode(StreamEnd(id=req.id, seq=seq + 1, finish_reason=cached.finish_reason,
                                                 usage=cached.usage, cached=True)))
