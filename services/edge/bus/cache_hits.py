"""Prompt-cache hits found by the edge itself: answered without the queue, a scheduler or an engine.

A hit replayed by the scheduler crosses five process hops (edge → nats-server → scheduler →
nats-server → edge) before the edge can answer; on a 2-core host most of its time is spent
waiting for a core at each of them. So the edge looks a cacheable HTTP request up itself, with
the same eligibility rule and key as the scheduler (``services.common.cache_key``) and the same
reader (``services.common.prompt_cache``: a memory mirror of the entries it read lately, kept
honest by a watch of the bucket, else one KV read). A hit is answered at once (``completions``
renders it exactly as it renders a hit the scheduler replays); a miss goes to the queue
unchanged, where the scheduler looks it up again (one more KV read per miss, nothing against a
generation) and counts it in ``llm_scheduler_cache_*``.

Staleness is the mirror's: a kept entry is dropped as soon as its key changes (new value,
delete, purge), and at most ``cache_mirror_check`` seconds after the bucket expired or evicted it.
"""

from __future__ import annotations

from prometheus_client import Counter

from schemas.cache import CachedResponse
from schemas.inference import InferenceRequest
from services.common.cache_key import cache_key, is_cacheable
from services.common.prompt_cache import PromptCacheReader
from services.edge.metrics import CACHE_KV, CACHE_MEMORY, EdgeMetrics


class EdgeCache:
    """Looks requests up in the prompt cache and counts what it found in the edge's metrics."""

    def __init__(self, reader: PromptCacheReader, metrics: EdgeMetrics) -> None:
        self.reader = reader
        self._from_memory: Counter = metrics.cache_hit_from[CACHE_MEMORY]
        self._from_kv: Counter = metrics.cache_hit_from[CACHE_KV]
        self._misses: Counter = metrics.cache_misses

    async def find(self, req: InferenceRequest) -> CachedResponse | None:
        """The stored answer to ``req``, or None: not cacheable (not counted), or not in the cache (a miss).

        ``req.model`` must be the canonical model id (``completions.build_request`` resolved it),
        which is what the scheduler keys by too.
        """
        if not is_cacheable(req):
            return None
        key = cache_key(req)
        hit = self.reader.kept(key)
        if hit is not None:
            self._from_memory.inc()
            return hit
        hit = await self.reader.lookup(key)
        (self._from_kv if hit is not None else self._misses).inc()
        return hit
