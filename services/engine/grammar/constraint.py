"""One sequence's grammar matcher and the token mask it puts on that row's logits, step by step.

Used only by the model thread that owns the sequence. A row without a constraint has none of
this: free rows in a batch never pay for constrained ones.
"""

from __future__ import annotations

import llguidance
import llguidance.numpy
import llguidance.torch
import numpy as np
import torch


class RowConstraint:
    """An llguidance matcher plus its one-row bitmask (allocated once per sequence)."""

    __slots__ = ("matcher", "_mask", "_np_mask")

    def __init__(self, matcher: llguidance.LLMatcher, n_vocab: int) -> None:
        self.matcher = matcher
        self._mask = llguidance.torch.allocate_token_bitmask(1, n_vocab)
        self._np_mask = self._mask.numpy()  # the same memory, for numpy logits (llama.cpp)

    def mask_torch(self, logits: torch.Tensor) -> None:
        """Set every token the grammar forbids next to -inf in one row of logits (in place)."""
        llguidance.torch.fill_next_token_bitmask(self.matcher, self._mask, 0)
        llguidance.torch.apply_token_bitmask_inplace(logits, self._mask.to(logits.device, non_blocking=True))

    def mask_numpy(self, logits: np.ndarray) -> None:
        """The same over a numpy row (llama.cpp's logits buffer, written in place)."""
        llguidance.numpy.fill_next_token_bitmask(self.matcher, self._np_mask, 0)
        llguidance.numpy.apply_token_bitmask_inplace(logits, self._np_mask)

    def advance(self, token: int) -> None:
        """Feed the sampled token (it was allowed by the mask, so this only fails on an internal error)."""
        self.matcher.consume_token(token)

    def advance_all(self, tokens: list[int]) -> None:
        """Feed tokens already generated elsewhere (a migrated request's continuation)."""
        self.matcher.consume_tokens(tokens)

    @property
    def error(self) -> str:
        """The matcher's error ("" if none): a limit hit while matching, or an internal fault."""
        return self.matcher.get_error() if self.matcher.is_error() else ""

    @property
    def complete(self) -> bool:
        """The answer so far is a complete match (ending it here is valid)."""
        return self.matcher.is_accepting()
