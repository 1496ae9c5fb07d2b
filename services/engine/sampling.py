"""Drawing one token from one row of logits in numpy: the engines' per-sequence samplers.

Both in-process engines sample row by row in their model thread, between two forward passes, so
every microsecond here is paid once per token per sequence. Measured on this machine (2 vCPUs,
the default model's 49,152 tokens):

- llama.cpp's sampler chain copies the vocabulary into a candidate array and loops over it in
  scalar code: right after a decode, greedy 51-78 us, temperature 436 us (``dist`` takes one
  ``expf`` per token), temperature and ``top_p`` 530 us.
- The transformers engine's torch code (one row, warm caches): greedy 45 us, temperature 1.1 ms
  (``softmax`` and ``multinomial``), temperature and ``top_p`` 4.9 ms (a sort of the whole
  vocabulary), ``top_k=40`` 1.3 ms.
- Here: greedy 4-8 us; temperature 71 us; with ``top_p`` 117-132 us; the transformers engine's
  ``top_k=40`` (torch's ``topk``, then this draw) 224 us.

``Nucleus`` draws from exactly the distribution those did (logits over the temperature; the
smallest most-likely set whose probability reaches ``top_p``; a draw in proportion inside it),
without sorting the vocabulary: tokens under ``(1 - top_p) / n`` of the total mass cannot be in the
nucleus, and the draw sums per block of ``BLOCK`` tokens before cumulating inside one block. Its
generator is numpy's PCG64 seeded with the request's seed: a seeded request draws the same
tokens alone or in any batch (not the tokens the engines' earlier samplers drew for that seed).
"""

from __future__ import annotations

import numpy as np

# The draw sums probabilities per block of this many tokens, then cumulates inside one block only.
BLOCK = 256


class Greedy:
    """Temperature 0 and nothing that changes the logits: the first highest logit."""

    def sample(self, row: np.ndarray) -> int:
        return int(row.argmax())

    def close(self) -> None:
        pass


class Nucleus:
    """A draw at ``temperature`` from the smallest most-likely set of tokens whose probability reaches ``top_p``."""

    def __init__(self, temperature: float, top_p: float, seed: int) -> None:
        self._inv_t = np.float32(1.0 / temperature)
        self._top_p = top_p
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self._scratch = np.zeros(0, dtype=np.float32)
        self._weights = self._scratch

    def sample(self, row: np.ndarray) -> int:
        """Draw one token id from ``row`` (float32 logits, -inf where a grammar forbids a token)."""
        if self._weights.size != row.size:  # sized by the first row: the tail past the vocabulary stays 0
            self._scratch = np.zeros(-(-row.size // BLOCK) * BLOCK, dtype=np.float32)
            self._weights = self._scratch[:row.size]
        w = self._weights  # unnormalised probabilities: exp((logit - max) / T), the most likely is 1
        np.subtract(row, row.max(), out=w)
        w *= self._inv_t
        np.exp(w, out=w)
        block_mass = self._scratch.reshape(-1, BLOCK).sum(axis=1, dtype=np.float64)
        if self._top_p < 1.0:
            return self._draw_nucleus(w, float(block_mass.sum()))
        return self._draw(block_mass)

    def _draw(self, block_mass: np.ndarray) -> int:
        """In proportion to every weight: find the block the draw falls in, then the token inside it."""
        cum = np.cumsum(block_mass)
        target = self._rng.random() * cum[-1]
        block = min(int(np.searchsorted(cum, target, side="right")), cum.size - 1)
        start = block * BLOCK
        inside = self._scratch[start:start + BLOCK]
        cum_inside = np.cumsum(inside, dtype=np.float64)
        rest = target - (cum[block - 1] if block else 0.0)
        i = int(np.searchsorted(cum_inside, rest, side="right"))
        if i >= BLOCK or inside[i] == 0.0:  # rounding between the two sums: the block's last likely token
            i = int(np.flatnonzero(inside)[-1])
        return start + i

    def _draw_nucleus(self, w: np.ndarray, total: float) -> int:
        """The nucleus without sorting the vocabulary.

        Tokens under ``t = (1 - top_p) * total / n`` weigh less than ``(1 - top_p) * total`` together,
        so those at or over ``t`` already reach ``top_p``: the nucleus is a most-likely prefix of them.
        ``t`` is raised while that stays true, and only the survivors are sorted.
        """
        keep = self._top_p * total
        t = (1.0 - self._top_p) * total / w.size
        ids = np.flatnonzero(w >= t)
        kept = w[ids]
        while ids.size > 64:
            t *= 8.0
            over = kept >= t
            if float(kept[over].sum(dtype=np.float64)) < keep:
                break
            ids, kept = ids[over], kept[over]
        order = np.argsort(-kept, kind="stable")
        cum = np.cumsum(kept[order], dtype=np.float64)
        size = min(int(np.searchsorted(cum, keep, side="left")) + 1, cum.size)  # the first prefix reaching top_p
        target = self._rng.random() * cum[size - 1]
        j = min(int(np.searchsorted(cum[:size], target, side="right")), size - 1)
        return int(ids[order[j]])

    def close(self) -> None:
        pass
