"""One batch of sequences sharing a KV cache: left-padded rows, per-row positions, one forward per step.

New rows are prefilled together and merged into the cache, left-padded to a common length
(the padding is masked out and positions count only real tokens); finished rows are dropped
between steps and columns that became padding in every row are trimmed.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch
import torch.nn.functional as F
from transformers import DynamicCache


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

    def prefill(self, model, group: Seq) -> torch.Tensor:
        """Prefill ``group`` in one forward, add its rows to the batch; the next-token logits, one row each."""
        width = max(len(s.prompt_ids) for s in group)
        ids = torch.tensor([[0] * (width - len(s.prompt_ids)) + s.prompt_ids for s in group], device=self._device)
        mask = torch.tensor([[0] * (width - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in group],
                            device=self._device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        self._merge(cache, mask)
        self.rows.extend(group)
        return out.logits[:, -1, :].float()

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


def _left_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Left-pad a ``[batch, heads, time, dim]`` tensor along time."""
    return F.pad(x, (0, 0, pad, 0)) if pad else x
