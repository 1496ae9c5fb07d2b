"""Prompt KV of llama.cpp sequences saved to host memory before its stream is reused, restored into any stream.

The context keeps one KV stream per sequence id (``model.py``). A finished sequence's cells stay in
its stream for the next prompt that shares their prefix, but the batch generator gives a new
sequence the lowest free id (``batching.py``: scattered ids split a decode into several graphs), so
two prompts that share only the chat template's header take turns in sequence 0, and each would
prefill itself again. So before the kept cells of a stream are cut, they are copied out with
``llama_state_seq_get_data`` (that sequence's cells only: about 23 KB a token for the default
model) into a ``PrefixCache`` bounded by ``--prefix-cache-bytes``. A new prompt that shares a longer
prefix with a saved copy than with the stream it is given has the copy written into that stream
(``llama_state_seq_set_data``, which works across streams) and prefills only the rest. Copying costs
microseconds per token; prefilling costs milliseconds. llama-server keeps a host-memory prompt cache
for the same reason (``--cache-ram``).

Entries are owned by the adapter file that computed them (``None``: the base model); an adapter's
KV is never given to another adapter or the base model. Used only from the model thread.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence as Seq
from pathlib import Path

import llama_cpp

from services.engine.backend import PrefixCacheStats
from services.engine.prefix_cache import PrefixCache, PrefixHit

log = logging.getLogger(__name__)

# Fewer tokens than this are not worth a copy or a lookup (a chat template's header is ~20-30).
MIN_SAVED_TOKENS = 8

Owner = Path | None


class SavedPrefixes:
    """Saved sequence KV of one llama.cpp context; its cache also counts every prompt's reuse, from a
    stream or a saved copy."""

    def __init__(self, ctx, memory, budget: int) -> None:
        self._ctx = ctx
        self._memory = memory
        self.cache: PrefixCache[ctypes.Array] = PrefixCache(budget, MIN_SAVED_TOKENS)
        self.restored = 0  # prompts that took a saved copy

    def place(self, seq_id: int, owner: Owner, prompt: Seq[int], kept_owner: Owner, kept: Seq[int],
              shared: int) -> int:
        """Prepare stream ``seq_id`` (holding ``kept``, of which ``shared`` tokens start ``prompt``) for ``prompt``:
        the prompt tokens whose KV it now holds (at most all but the last, whose logits are needed).

        The kept cells past the shared part are saved first if that many are worth keeping; then
        the stream keeps its shared part, or takes a saved copy sharing more.
        """
        keep = max(0, min(shared, len(prompt) - 1))
        if len(kept) - keep >= MIN_SAVED_TOKENS:
            self._save(seq_id, kept_owner, kept)
        hit = self.cache.peek(owner, prompt)
        if hit is not None and hit.length > keep:
            keep = self._restore(seq_id, hit)
        llama_cpp.llama_memory_seq_rm(self._memory, seq_id, keep if keep > 0 else -1, -1)
        self.cache.count(len(prompt), keep)
        return keep

    def stats(self) -> PrefixCacheStats:
        """Reuse counts so far and the bytes saved now (read from another thread: plain ints)."""
        cache = self.cache
        return PrefixCacheStats(hits=cache.hits, misses=cache.misses, reused_tokens=cache.reused_tokens,
                                nbytes=cache.nbytes)

    def _save(self, seq_id: int, owner: Owner, tokens: Seq[int]) -> None:
        if not self.cache.enabled or self.cache.covers(owner, tokens):
            return
        size = llama_cpp.llama_state_seq_get_size(self._ctx, seq_id)
        if not size or size > self.cache.budget:
            return
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self._ctx, buf, size, seq_id)
        if written:
            self.cache.store(owner, tokens, buf, written)

    def _restore(self, seq_id: int, hit: PrefixHit[ctypes.Array]) -> int:
        """Write the saved copy into the (emptied) stream; its usable length, 0 if llama.cpp refused it."""
        llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
        if llama_cpp.llama_state_seq_set_data(self._ctx, hit.payload, len(hit.payload), seq_id):
            self.cache.touch(hit)
            self.restored += 1
            return hit.length
        log.warning("llama.cpp refused a saved prompt state (%d tokens); prefilling instead", hit.length)
        llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
        return 0
