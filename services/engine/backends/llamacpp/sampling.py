"""The llama.cpp engine's per-sequence samplers over one row of its logits buffer, picked per request.

- ``Greedy`` and ``Nucleus`` (``services.engine.sampling``, numpy): greedy; a temperature with
  or without ``top_p``, and no ``top_k``, penalty or bias. llama.cpp's own chain took 51-78 us
  and 436-530 us a token for those (it loops over a copy of the whole vocabulary in scalar code),
  in the model thread between two decodes, for every sequence: at 32 sampled streams, over 14 ms
  a step.
- ``Chain`` (``top_k``, penalties or ``logit_bias``): llama.cpp's chain, in HF/OpenAI order
  (bias, penalties, temperature, top-k, top-p, a seeded draw). ``top_k`` keeps it fast (43 us with
  ``top_k=40``: llama.cpp sorts only k candidates).
"""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np

from schemas.inference import SamplingParams
from services.engine.sampling import Greedy, Nucleus

# llama_sampler_init_dist treats this seed as "pick a random one" (LLAMA_DEFAULT_SEED).
_RANDOM_SEED = 0xFFFFFFFF


# Views kept per context before they are all dropped (llama.cpp moved its output buffer that often).
_MAX_VIEWS = 1024


class LogitsRows:
    """Batch rows' logits of one context: float32 views of llama.cpp's own buffer (writes are seen by its samplers).

    A view is made once per row address and kept: made right after a decode, with the caches cold,
    a new one cost 30-35 us a row (ctypes' array type and buffer export), a kept one 3. An address
    is only ever looked up as llama.cpp returns it for this step's row, so a view of a buffer
    llama.cpp has since replaced is never read unless that memory is a row again.
    """

    __slots__ = ("_ctx", "_n_vocab", "_views")

    def __init__(self, ctx, n_vocab: int) -> None:
        self._ctx = ctx
        self._n_vocab = n_vocab
        self._views: dict[int, np.ndarray] = {}

    def __call__(self, index: int) -> np.ndarray:
        address = ctypes.addressof(llama_cpp.llama_get_logits_ith(self._ctx, index).contents)  # NULL: ValueError
        view = self._views.get(address)
        if view is None:
            if len(self._views) >= _MAX_VIEWS:
                self._views.clear()
            view = self._views[address] = np.frombuffer((ctypes.c_float * self._n_vocab).from_address(address),
                                                        dtype=np.float32)
        return view


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
        return Nucleus(params.temperature, params.top_p, seed)
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
