"""Prompt-prefix KV reuse for the transformers engine, bounded in bytes. Used only from the model thread.

After a prompt is prefilled, its keys and values (every layer, ``[1, heads, tokens, dim]``) are
kept under ``(adapter, prompt token ids)``. A later prompt for the same adapter (``None``: the
base model; an adapter on q/k/v changes the keys and values, so adapters never share) that
starts with the same tokens takes the longest such prefix from here and prefills only the rest:
a repeated system prompt, the earlier turns of a conversation. One model thread owns one model,
so entries never cross models.

The stored tensors are copies (the batch's cache is padded, trimmed and merged in place), counted
in bytes against ``budget``; the least recently used entries go first, and an entry that is a
prefix of a newer one is replaced by it. At least one prompt token is always left to prefill, so
the first token's logits come from a forward as usual.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

# Shorter shared prefixes are recomputed: copying their KV costs about what prefilling them does.
MIN_REUSE_TOKENS = 16

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values, ``[1, heads, tokens, dim]``


@dataclass(frozen=True)
class PrefixHit:
    """The first ``length`` tokens of a prompt already have these keys and values (views, not copies)."""

    length: int
    layers: Layers


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    layers: Layers
    nbytes: int


def _common_length(a: Seq[int], b: Seq[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """Prompt KV by ``(adapter, token ids)``, at most ``budget`` bytes, least recently used evicted first."""

    def __init__(self, budget: int) -> None:
        self.budget = max(0, budget)
        self._entries: OrderedDict[tuple[str | None, tuple[int, ...]], _Entry] = OrderedDict()
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

    def lookup(self, adapter: str | None, prompt: Seq[int]) -> PrefixHit | None:
        """The longest stored prefix of ``prompt`` for ``adapter`` (leaving one token to prefill), or None."""
        if not self.enabled or len(prompt) <= MIN_REUSE_TOKENS:
            return None
        best, best_len = None, 0
        for (owner, _), entry in self._entries.items():
            if owner != adapter:
                continue
            n = min(_common_length(entry.tokens, prompt), len(prompt) - 1)
            if n > best_len:
                best, best_len = entry, n
        if best is None or best_len < MIN_REUSE_TOKENS:
            self.misses += 1
            return None
        self._entries.move_to_end((adapter, best.tokens))
        self.hits += 1
        self.reused_tokens += best_len
        return PrefixHit(best_len, [(k[:, :, :best_len], v[:, :, :best_len]) for k, v in best.layers])

    def store(self, adapter: str | None, prompt: Seq[int], layers: Layers) -> None:
        """Keep ``layers`` (already copies) as the KV of ``prompt``, evicting to stay within the budget."""
        if not self.enabled or len(prompt) <= MIN_REUSE_TOKENS:
            return
        tokens = tuple(prompt)
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        if nbytes > self.budget:
            return
        for key in [k for k in self._entries if k[0] == adapter and tokens[:len(k[1])] == k[1]]:
            self._remove(key)  # a prefix of the new prompt (or the same prompt): the new entry covers it
        while self.nbytes + nbytes > self.budget:
            self._remove(next(iter(self._entries)))
        self._entries[(adapter, tokens)] = _Entry(tokens, layers, nbytes)
        self.nbytes += nbytes

    def covers(self, adapter: str | None, prompt: Seq[int]) -> bool:
        """Whether exactly ``prompt`` is stored already (so storing it again would only copy)."""
        return (adapter, tuple(prompt)) in self._entries

    def drop_adapter(self, adapter: str) -> None:
        """Forget ``adapter``'s entries (it was unloaded; a reload under that id may be other weights)."""
        for key in [k for k in self._entries if k[0] == adapter]:
            self._remove(key)

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()
        self.nbytes = 0

    def _remove(self, key: tuple[str | None, tuple[int, ...]]) -> None:
        self.nbytes -= self._entries.pop(key).nbytes
