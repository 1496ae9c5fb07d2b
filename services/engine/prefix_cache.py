"""Prompt-prefix KV kept in memory for reuse, bounded in bytes: the bookkeeping the engines share.

An entry is the KV of a token sequence, in whatever form its engine keeps it (tensors per layer in
the transformers engine, a llama.cpp sequence-state blob in the llama.cpp engine), stored under
``(owner, token ids)``. The owner is what computed those keys and values: ``None`` for the base
model, else the adapter (an adapter on q/k/v changes them, so owners never share). A later prompt
of the same owner that starts with the same tokens takes the longest such prefix and prefills
only the rest: a repeated system prompt, the earlier turns of a conversation, a chat template's
header. One model thread owns one cache, so it needs no lock.

Entries count their bytes against ``budget``; the least recently used go first, and an entry that
is a prefix of a newer one is replaced by it. At least one prompt token is always left to prefill,
because the first sampled token needs that token's logits. Prefixes shorter than
``min_tokens`` are not worth a lookup (copying their KV costs about what recomputing it does).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence as Seq
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")

# ``--prefix-cache-bytes`` by default: host memory for prompt KV kept for reuse.
DEFAULT_PREFIX_CACHE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class PrefixHit(Generic[T]):
    """The first ``length`` tokens of a prompt have their KV in ``payload`` (which may hold more)."""

    length: int
    payload: T
    key: tuple = ()  # the entry's key in its cache


@dataclass
class _Entry(Generic[T]):
    tokens: np.ndarray
    payload: T
    nbytes: int


def common_length(a: Seq[int] | np.ndarray, b: Seq[int] | np.ndarray) -> int:
    """Length of the common prefix of two token sequences (vectorised: prompts run to thousands)."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(diff[0]) if diff.size else n


class PrefixCache(Generic[T]):
    """KV payloads by ``(owner, token ids)``, at most ``budget`` bytes, least recently used evicted first."""

    def __init__(self, budget: int, min_tokens: int = 16) -> None:
        self.budget = max(0, budget)
        self.min_tokens = min_tokens
        self._entries: OrderedDict[tuple[Hashable, tuple[int, ...]], _Entry[T]] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.reused_tokens = 0

    @property
    def enabled(self) -> bool:
        """A zero budget turns reuse off (``--prefix-cache-bytes 0``)."""
        return self.budget > 0

    def __len__(self) -> int:
        return len(self._entries)

    def peek(self, owner: Hashable, prompt: Seq[int]) -> PrefixHit[T] | None:
        """The longest stored prefix of ``prompt`` for ``owner`` (leaving one token to prefill), not
        counted and not marked as used; None below ``min_tokens``."""
        if not self.enabled or len(prompt) <= self.min_tokens:
            return None
        best, best_len = None, 0
        ids = np.asarray(prompt, dtype=np.int64)
        for key, entry in self._entries.items():
            if key[0] == owner:
                n = min(common_length(entry.tokens, ids), len(prompt) - 1)
                if n > best_len:
                    best, best_len = key, n
        if best is None or best_len < self.min_tokens:
            return None
        return PrefixHit(best_len, self._entries[best].payload, best)

    def lookup(self, owner: Hashable, prompt: Seq[int]) -> PrefixHit[T] | None:
        """``peek``, counted as a hit or a miss, the entry marked as recently used."""
        if not self.enabled or len(prompt) <= self.min_tokens:
            return None
        hit = self.peek(owner, prompt)
        if hit is not None:
            self.touch(hit)
        self.count(len(prompt), hit.length if hit is not None else 0)
        return hit

    def touch(self, hit: PrefixHit[T]) -> None:
        """Mark ``hit``'s entry (from ``peek``) as the most recently used."""
        if hit.key in self._entries:
            self._entries.move_to_end(hit.key)

    def count(self, prompt_len: int, reused: int) -> None:
        """One prompt of ``prompt_len`` tokens reused the KV of ``reused`` of them (from this cache or
        elsewhere): a hit from ``min_tokens`` up, a miss for a longer prompt that reused fewer."""
        if reused >= self.min_tokens:
            self.hits += 1
        elif prompt_len > self.min_tokens:
            self.misses += 1
        self.reused_tokens += reused

    def store(self, owner: Hashable, tokens: Seq[int], payload: T, nbytes: int) -> None:
        """Keep ``payload`` (``nbytes`` large) as the KV of ``tokens``, evicting to stay within the budget."""
        if not self.enabled or len(tokens) <= self.min_tokens or nbytes > self.budget:
            return
        key_tokens = tuple(tokens)
        for key in [k for k in self._entries if k[0] == owner and key_tokens[:len(k[1])] == k[1]]:
            self._remove(key)  # a prefix of the new tokens (or the same ones): the new entry covers it
        while self.nbytes + nbytes > self.budget:
            self._remove(next(iter(self._entries)))
        self._entries[(owner, key_tokens)] = _Entry(np.asarray(tokens, dtype=np.int64), payload, nbytes)
        self.nbytes += nbytes

    def covers(self, owner: Hashable, tokens: Seq[int]) -> bool:
        """Whether an entry holds all of ``tokens`` (exactly them, or them and more), so storing them would only copy."""
        key_tokens = tuple(tokens)
        return any(k[0] == owner and k[1][:len(key_tokens)] == key_tokens for k in self._entries)

    def drop_owner(self, owner: Hashable) -> None:
        """Forget ``owner``'s entries (an adapter was unloaded; a reload under its id may be other weights)."""
        for key in [k for k in self._entries if k[0] == owner]:
            self._remove(key)

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()
        self.nbytes = 0

    def _remove(self, key: tuple[Hashable, tuple[int, ...]]) -> None:
        self.nbytes -= self._entries.pop(key).nbytes
