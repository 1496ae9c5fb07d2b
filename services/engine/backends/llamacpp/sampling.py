"""Per-sequence samplers over one row of llama.cpp's logits buffer, picked per request by ``new_sampler``.

llama.cpp's sampler chain (0.3.36) copies the whole vocabulary into a candidate array and runs
scalar loops over it. Measured here, in the model thread right after a decode (cold caches), for
SmolLM2's 49,152 tokens: greedy 51-78 us a token, temperature alone 436 us (``dist`` takes one
``expf`` per token), temperature and ``top_p`` 530 us. That time is the model thread's, between
two decodes, for every sequence of the batch: at 32 streams with a temperature, over 14 ms a step.
So the common requests get numpy instead:

- ``Greedy`` (temperature 0, nothing else): the first highest logit, which is what llama.cpp's
  greedy sampler picks; 4 us plus reading the row.
- ``Nucleus`` (a temperature, optionally ``top_p``; no ``top_k``, penalty or bias): the same
  distribution as llama.cpp's ``temp -> top_p -> dist`` (logits over the temperature; the smallest
  most-likely set whose probability reaches ``top_p``; a draw in proportion to the probabilities
  inside it) in vectorised passes, 75 us for temperature alone. Its generator is numpy's PCG64
  seeded with the request's seed, so a seeded request draws the same tokens alone or in any batch
  (not the same tokens llama.cpp's mt19937 would draw for that seed).
- ``Chain`` (``top_k``, penalties or ``logit_bias``): llama.cpp's own chain, in HF/OpenAI order
  (bias, penalties, temperature, top-k, top-p, a seeded draw). ``top_k`` keeps it fast (44 us with
  ``top_k=40``: llama.cpp sorts only k candidates).
"""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np

from schemas.inference import SamplingParams

# llama_sampler_init_dist treats this seed as "pick a random one" (LLAMA_DEFAULT_SEED).
_RANDOM_SEED = 0xFFFFFFFF
# The draw sums probabilities per block of this many tokens, then cumulates inside one block only.
BLOCK = 256


def logits_row(ctx, index: int, n_vocab: int) -> np.ndarray:
    """Batch row ``index``'s logits: a float32 view of llama.cpp's own buffer (writes are seen by its samplers)."""
    address = ctypes.cast(llama_cpp.llama_get_logits_ith(ctx, index), ctypes.c_void_p).value
    return np.frombuffer((ctypes.c_float * n_vocab).from_address(address), dtype=np.float32)


class Greedy:
    """Temperature 0 and nothing that changes the logits: the first highest logit."""

    def sample(self, row: np.ndarray) -> int:
        return int(row.argmax())

    def close(self) -> None:
        pass


class Nucleus:
    """A draw at ``temperature`` from the smallest most-likely set of tokens whose probability reaches ``top_p``."""

    def __init__(self, n_vocab: int, temperature: float, top_p: float, seed: int) -> None:
        self._inv_t = np.float32(1.0 / temperature)
        self._top_p = top_p
        self._rng = np.random.Generator(np.random.PCG64(seed))
        blocks = -(-n_vocab // BLOCK)
        self._scratch = np.zeros(blocks * BLOCK, dtype=np.float32)  # the tail past n_vocab stays 0
        self._weights = self._scratch[:n_vocab]

    def sample(self, row: np.ndarray) -> int:
        """Draw one token id from ``row`` (raw logits, -inf where a grammar forbids a token)."""
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


class Chain:
    """llama.cpp's sampler chain; it reads the row from llama.cpp's buffer itself."""

    def __init__(self, chain, ctx) -> None:
        self._chain = chain
        self._ctx = ctx

    def sample_at(self, index: int) -> int:
        return llama_cpp.llama_sampler_sample(self._chain, self._ctx, index)

    def close(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None


Sampler = Greedy | Nucleus | Chain


def new_sampler(params: SamplingParams, seed: int, window: int, n_vocab: int, ctx) -> Sampler:
    """The cheapest sampler that draws from ``params``' distribution; penalties look back ``window`` tokens."""
    plain = not params.logit_bias and params.repetition_penalty == 1.0 and not params.frequency_penalty \
        and not params.presence_penalty
    if plain and params.temperature <= 0.0:
        return Greedy()
    seed %= _RANDOM_SEED  # never llama.cpp's "random" sentinel: a seeded request must be reproducible
    if plain and not 0 < params.top_k < n_vocab:
        return Nucleus(n_vocab, params.temperature, params.top_p, seed)
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_params(no_perf=True))
    add = llama_cpp.llama_sampler_chain_add
    if params.logit_bias:
        biases = (llama_cpp.llama_logit_bias * len(params.logit_bias))(
            *(llama_cpp.llama_logit_bias(token, bias) for token, bias in params.logit_bias.items()))
        add(chain, llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(params.logit_bias), biases))
    if params.repetition_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
        add(chain, llama_cpp.llama_sampler_init_penalties(n_vocab, max(1, window), params.repetition_penalty,
                                                          params.frequency_penalty, params.presence_penalty))
    if params.temperature <= 0.0:
        add(chain, llama_cpp.llama_sampler_init_greedy())
        return Chain(chain, ctx)
    add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
    if params.top_k > 0:
        add(chain, llama_cpp.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1.0:
        add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
    add(chain, llama_cpp.llama_sampler_init_dist(seed))
    return Chain(chain, ctx)
