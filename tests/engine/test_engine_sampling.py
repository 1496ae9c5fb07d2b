"""The engines' samplers: that the numpy ones (``services.engine.sampling``) draw from exactly the
distribution llama.cpp's chain and the transformers engine's torch code defined (temperature, then
the top-p nucleus), and which sampler a request gets in each engine.

The draws are seeded, so every check here gives the same answer on every run; each bound is
several standard errors wide and fails for a sampler that draws from a different distribution
(a wrong temperature, a nucleus one token too small or too large, a skipped block).
"""

from __future__ import annotations

import numpy as np
import pytest

import torch

from schemas.inference import SamplingParams
from services.engine.backends.llamacpp.sampling import Chain, new_sampler
from services.engine.backends.transformers.sampling import sample_row
from services.engine.sampling import BLOCK, Greedy, Nucleus

VOCAB = 3 * BLOCK + 77  # several blocks and a padded tail
DRAWS = 40_000


def logits(seed: int = 0) -> np.ndarray:
    """A peaked distribution, as a language model's: a few likely tokens, a long tail, spread over the blocks."""
    rng = np.random.default_rng(seed)
    row = rng.normal(0.0, 2.0, VOCAB).astype(np.float32)
    row[rng.choice(VOCAB, 12, replace=False)] += 6.0
    return row


def exact(row: np.ndarray, temperature: float, top_p: float = 1.0) -> np.ndarray:
    """The reference: softmax(row / T), cut to the smallest most-likely prefix reaching top_p, renormalised."""
    z = row.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        size = int(np.searchsorted(np.cumsum(p[order]), top_p, side="left")) + 1
        cut = np.zeros_like(p)
        cut[order[:size]] = p[order[:size]]
        p = cut / cut.sum()
    return p


def frequencies(sampler: Nucleus, row: np.ndarray, n: int = DRAWS) -> np.ndarray:
    counts = np.zeros(VOCAB)
    for _ in range(n):
        counts[sampler.sample(row)] += 1
    return counts / n


def assert_matches(freq: np.ndarray, p: np.ndarray, n: int = DRAWS) -> None:
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(p)), "a token outside the distribution was drawn"
    assert (freq[p > 10 / n] > 0).all(), "a token of the distribution was never drawn"
    sd = np.sqrt(np.maximum(p * (1 - p), 1e-12) / n)  # a certain token (p = 1) must come every time
    likely = p > 0.002
    worst = np.max(np.abs(freq - p)[likely] / sd[likely])
    assert worst < 5.0, f"a token's frequency is {worst:.1f} standard errors from its probability"


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_a_temperature_draw_follows_the_softmax_at_that_temperature(temperature):
    row = logits(1)
    assert_matches(frequencies(Nucleus(temperature, 1.0, seed=3), row), exact(row, temperature))


@pytest.mark.parametrize(("temperature", "top_p"), [(0.7, 0.9), (1.0, 0.5), (1.3, 0.98)])
def test_a_top_p_draw_stays_in_the_nucleus_and_follows_its_renormalised_probabilities(temperature, top_p):
    row = logits(2)
    p = exact(row, temperature, top_p)
    assert_matches(frequencies(Nucleus(temperature, top_p, seed=4), row), p)


@pytest.mark.parametrize(("top_p", "nucleus"), [(0.35, 1), (0.45, 2), (0.65, 2), (0.75, 3), (0.92, 4), (0.99, 4)])
def test_the_nucleus_is_the_smallest_most_likely_set_reaching_top_p(top_p, nucleus):
    # Probabilities 0.4, 0.3, 0.2, 0.095 and a tail of 0.005 over every other token: the nucleus
    # boundary falls on a token likely enough that one too many or too few shows in the draws.
    p = np.full(VOCAB, 0.005 / (VOCAB - 4))
    top = [700, 3, 260, 512]  # in different blocks, not in order
    p[top] = [0.4, 0.3, 0.2, 0.095]
    sampler = Nucleus(1.0, top_p, seed=7)
    drawn = {sampler.sample(np.log(p).astype(np.float32)) for _ in range(2000)}
    assert drawn == set(top[:nucleus])


def test_a_tiny_top_p_keeps_only_the_most_likely_token():
    row = logits(3)
    sampler = Nucleus(1.0, 0.0, seed=5)
    assert {sampler.sample(row) for _ in range(200)} == {int(row.argmax())}


def test_tokens_a_grammar_forbids_are_never_drawn():
    row = logits(4)
    allowed = np.arange(5, VOCAB, 7)  # scattered over every block, the top tokens mostly forbidden
    masked = np.full(VOCAB, -np.inf, dtype=np.float32)
    masked[allowed] = row[allowed]
    for top_p in (1.0, 0.8):
        freq = frequencies(Nucleus(1.0, top_p, seed=6), masked, 20_000)
        assert set(np.flatnonzero(freq)) <= set(allowed)
        assert_matches(freq, exact(masked, 1.0, top_p), 20_000)


def test_the_same_seed_draws_the_same_tokens_and_another_seed_does_not():
    row = logits(5)

    def draws(seed):
        sampler = Nucleus(1.2, 0.95, seed=seed)
        return [sampler.sample(row) for _ in range(64)]

    assert draws(11) == draws(11)
    assert draws(11) != draws(12)


def test_greedy_takes_the_first_highest_logit():
    row = logits(6)
    row[[40, 500]] = row.max() + 1.0
    assert Greedy().sample(row) == 40


@pytest.mark.parametrize(("params", "kind"), [
    (SamplingParams(temperature=0.0), Greedy),
    (SamplingParams(temperature=0.8), Nucleus),
    (SamplingParams(temperature=0.8, top_p=0.9), Nucleus),
    (SamplingParams(temperature=0.8, top_k=VOCAB), Nucleus),  # a top-k that keeps every token changes nothing
    (SamplingParams(temperature=0.8, top_k=40), Chain),
    (SamplingParams(temperature=0.0, logit_bias={3: 5.0}), Chain),
    (SamplingParams(temperature=0.8, frequency_penalty=0.5), Chain),
    (SamplingParams(temperature=0.0, repetition_penalty=1.2), Chain),
])
def test_each_llama_cpp_request_gets_the_sampler_that_can_draw_its_distribution(params, kind):
    sampler = new_sampler(params, seed=1, window=16, n_vocab=VOCAB, ctx=None)
    try:
        assert type(sampler) is kind
    finally:
        sampler.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_transformers_engine_takes_the_first_highest_logit_when_greedy(dtype):
    row = torch.from_numpy(logits(7))
    row[[90, 600]] = row.max() + 1.0
    assert sample_row(row.to(dtype), SamplingParams(temperature=0.0), None) == 90


def test_the_transformers_engine_draws_from_a_half_precision_row():
    row = torch.from_numpy(logits(9)).to(torch.bfloat16)
    draw = Nucleus(1.0, 0.5, seed=2)
    drawn = {sample_row(row, SamplingParams(temperature=1.0, top_p=0.5), draw) for _ in range(500)}
    p = exact(row.float().numpy(), 1.0, 0.5)
    assert drawn <= set(np.flatnonzero(p)) and len(drawn) > 1


def test_the_transformers_engine_cuts_to_top_k_and_then_draws_at_the_temperature():
    row = logits(8)
    top = np.argsort(-row)[:5]
    cut = np.full(VOCAB, -np.inf, dtype=np.float32)
    cut[top] = row[top]
    params = SamplingParams(temperature=0.8, top_k=5)
    draw = Nucleus(0.8, 1.0, seed=9)
    counts = np.zeros(VOCAB)
    tensor = torch.from_numpy(row)
    for _ in range(20_000):
        counts[sample_row(tensor, params, draw)] += 1
    assert_matches(counts / 20_000, exact(cut, 0.8), 20_000)
