"""One sequence's grammar matcher and the token mask it puts on that row's logits, step by step.

Used only by the model thread that owns the sequence. A row without a constraint has none of
this: free rows in a batch never pay for constrained ones. The bitmask is unpacked with numpy
rather than llguidance's torch helper, which is a ``torch.compile`` kernel: compiling it on a
CPU host took minutes on first use and stalled every row of the batch meanwhile.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import llguidance
import llguidance.numpy
import numpy as np

if TYPE_CHECKING:  # torch is imported only by the engines that use it: the llama.cpp engine never loads it
    import torch


class RowConstraint:
    """An llguidance matcher plus its one-row bitmask (allocated once per sequence)."""

    __slots__ = ("matcher", "_mask", "_n_vocab")

    def __init__(self, matcher: llguidance.LLMatcher, n_vocab: int) -> None:
        self.matcher = matcher
        self._n_vocab = n_vocab
        self._mask = llguidance.numpy.allocate_token_bitmask(1, n_vocab)

    def _forbidden(self) -> np.ndarray:
        """True for every token the grammar forbids next (the matcher's bitmask: bit i of word j is token 32j+i)."""
        llguidance.numpy.fill_next_token_bitmask(self.matcher, self._mask, 0)
        bits = np.unpackbits(self._mask.view(np.uint8), bitorder="little")[:self._n_vocab]
        return bits == 0

    def mask_torch(self, logits: torch.Tensor) -> None:
        """Set every token the grammar forbids next to -inf in one row of logits (in place)."""
        import torch

        forbidden = torch.from_numpy(self._forbidden()).to(logits.device, non_blocking=True)
        logits[:self._n_vocab].masked_fill_(forbidden, float("-inf"))
        logits[self._n_vocab:] = float("-inf")  # rows past the tokenizer's vocabulary (padding) are never valid

    def mask_numpy(self, logits: np.ndarray) -> None:
        """The same over a numpy row (llama.cpp's logits buffer, written in place)."""
        logits[:self._n_vocab][self._forbidden()] = -np.inf
        logits[self._n_vocab:] = -np.inf

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
