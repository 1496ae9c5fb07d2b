"""One batch of sequences sharing a KV cache: left-padded rows, per-row positions, one forward per step.

New rows are prefilled together and merged into the cache, left-padded to a common length
(the padding is masked out and positions count only real tokens); finished rows are dropped
between steps and columns that became padding in every row are trimmed. A row whose prompt
starts with a cached prefix (``prefix_cache.PrefixHit``) enters the prefill with that prefix's
keys and values already in the cache and feeds only the rest of its prompt; each row's section
is ``[pad][reused prefix][pad][rest of the prompt]``, the pads masked out.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from services.engine.backends.transformers.prefix_cache import Layers, PrefixHit


class RowBatch:
    """Rows (any objects with ``prompt_ids``, ``last_token`` and ``done``) and their merged KV cache."""

    def __init__(self, device: torch.device) -> None:
        self.rows: list = []
        self._device = device
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def clear(self) -> None:
        """Forget every row and the cache (after a failed forward)."""
        self.rows, self._cache, self._mask = [], None, None

    def prefill(self, model, group: Seq, hits: Seq[PrefixHit | None] = (),
                keep: Seq[bool] = ()) -> tuple[torch.Tensor, list[Layers | None]]:
        """Prefill ``group`` in one forward and add its rows to the batch.

        ``hits[i]``: row i's prompt prefix whose KV is reused (fed from the cache, not recomputed).
        Returns the next-token logits, one row each, and for each row with ``keep[i]`` a copy of its
        whole prompt's keys and values (for the prefix cache).
        """
        hits = list(hits) or [None] * len(group)
        reused = [h.length if h else 0 for h in hits]
        past = max(reused)
        rest = [s.prompt_ids[n:] for s, n in zip(group, reused)]
        width = max(len(r) for r in rest)
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rest], device=self._device)
        mask = torch.tensor([[0] * (past - n) + [1] * n + [0] * (width - len(r)) + [1] * len(r)
                             for n, r in zip(reused, rest)], device=self._device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, past:]
        cache = DynamicCache(config=model.config)
        if past:
            _fill(cache, hits, past)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        kept = [_row_kv(cache, mask, i) if want else None for i, want in enumerate(keep)]
        self._merge(cache, mask)
        self.rows.extend(group)
        return out.logits[:, -1, :].float(), kept

    @staticmethod
    def reusable(model) -> bool:
        """Whether a prompt's KV can be cut to a prefix: every layer a full-attention ``DynamicLayer``.

        A sliding-window or linear-attention layer keeps only recent or summarized state, which a
        prefix of it is not.
        """
        return all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)

    def decode(self, model) -> torch.Tensor:
        """Feed every row its last token; the next-token logits, one row each."""
        batch = len(self.rows)
        input_ids = torch.tensor([[s.last_token] for s in self.rows], device=self._device)
        positions = self._mask.sum(dim=1, keepdim=True)
        self._mask = torch.cat([self._mask, self._mask.new_ones((batch, 1))], dim=1)
        out = model(input_ids=input_ids, attention_mask=self._mask, position_ids=positions,
                    past_key_values=self._cache, use_cache=True)
        return out.logits[:, -1, :].float()

    def _merge(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append prefilled rows to the batch, left-padding both sides to a common length."""
        if self._cache is None:
            self._cache, self._mask = cache, mask
            return
        have, new = self._mask.shape[1], mask.shape[1]
        width = max(have, new)
        for mine, theirs in zip(self._cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width - have), _left_pad(theirs.keys, width - new)])
            mine.values = torch.cat([_left_pad(mine.values, width - have), _left_pad(theirs.values, width - new)])
        self._mask = torch.cat([F.pad(self._mask, (width - have, 0)), F.pad(mask, (width - new, 0))])

    def compact(self) -> None:
        """Drop finished rows from the batch and trim columns that are padding in every row."""
        keep = [i for i, s in enumerate(self.rows) if not s.done]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        idx = torch.tensor(keep, device=self._device)
        mask = self._mask.index_select(0, idx)
        first = int(torch.nonzero(mask.sum(dim=0))[0])
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, first:]
            layer.values = layer.values.index_select(0, idx)[:, :, first:]
        self._mask = mask[:, first:]


def _fill(cache: DynamicCache, hits: Seq[PrefixHit | None], past: int) -> None:
    """Put each row's reused prefix KV in ``cache``, left-padded to ``past`` tokens (zeros for a row without)."""
    some = next(h for h in hits if h)
    for layer, (key, value) in enumerate(some.layers):
        blank_k = key.new_zeros((1, key.shape[1], past, key.shape[3]))
        blank_v = value.new_zeros((1, value.shape[1], past, value.shape[3]))
        keys = torch.cat([_left_pad(h.layers[layer][0], past - h.length) if h else blank_k for h in hits])
        values = torch.cat([_left_pad(h.layers[layer][1], past - h.length) if h else blank_v for h in hits])
        cache.update(keys, values, layer)


def _row_kv(cache: DynamicCache, mask: torch.Tensor, row: int) -> Layers:
    """A copy of one row's keys and values over its real (unmasked) tokens, ``[1, heads, tokens, dim]``."""
    cols = torch.nonzero(mask[row]).squeeze(1)
    return [(layer.keys[row:row + 1].index_select(2, cols), layer.values[row:row + 1].index_select(2, cols))
            for layer in cache.layers]


def _left_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Left-pad a ``[batch, heads, time, dim]`` tensor along time."""
    return F.pad(x, (0, 0, pad, 0)) if pad else x
