"""Prompt-prefix KV reuse for the transformers engine: the shared ``services.engine.prefix_cache``
over per-layer tensors. Used only from the model thread.

After a prompt is prefilled, its keys and values (every layer, ``[1, heads, tokens, dim]``, copies:
the batch's cache is padded, trimmed and merged in place) are kept under ``(adapter, prompt token
ids)``; a later prompt of the same adapter takes the longest stored prefix as views cut to its length.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from services.engine import prefix_cache

# Shorter shared prefixes are recomputed: copying their KV costs about what prefilling them does.
MIN_REUSE_TOKENS = 16

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values, ``[1, heads, tokens, dim]``


@dataclass(frozen=True)
class PrefixHit:
    """The first ``length`` tokens of a prompt already have these keys and values (views, not copies)."""

    length: int
    layers: Layers


class PrefixCache(prefix_cache.PrefixCache[Layers]):
    """Prompt KV tensors by ``(adapter, token ids)``, at most ``budget`` bytes."""

    def __init__(self, budget: int) -> None:
        super().__init__(budget, MIN_REUSE_TOKENS)

    def lookup(self, adapter: str | None, prompt: Seq[int]) -> PrefixHit | None:  # type: ignore[override]
        """The longest stored prefix of ``prompt`` for ``adapter`` as views of its length, or None."""
        hit = super().lookup(adapter, prompt)
        if hit is None:
            return None
        n = hit.length
        return PrefixHit(n, [(k[:, :, :n], v[:, :, :n]) for k, v in hit.payload])

    def store(self, adapter: str | None, prompt: Seq[int], layers: Layers) -> None:  # type: ignore[override]
        """Keep ``layers`` (already copies) as the KV of ``prompt``."""
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        super().store(adapter, prompt, layers, nbytes)

    def drop_adapter(self, adapter: str) -> None:
        """Forget ``adapter``'s entries (it was unloaded)."""
        self.drop_owner(adapter)
