"""Per-request token sampling over a batch of logits (each row has its own parameters and RNG)."""

from __future__ import annotations

import torch

from schemas.inference import SamplingParams


def apply_penalties(logits: torch.Tensor, params: SamplingParams, counts: dict[int, int],
                    prompt_ids: torch.Tensor | None) -> torch.Tensor:
    """OpenAI presence/frequency penalties over generated tokens; HF repetition penalty over prompt+output."""
    if counts and (params.presence_penalty or params.frequency_penalty):
        ids = torch.tensor(list(counts), device=logits.device)
        freq = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
        logits[ids] -= params.presence_penalty + params.frequency_penalty * freq
    if params.repetition_penalty != 1.0:
        seen = list(counts)
        ids = torch.tensor(seen, dtype=torch.long, device=logits.device) if seen else None
        if prompt_ids is not None:
            ids = prompt_ids if ids is None else torch.cat([ids, prompt_ids])
        if ids is not None and ids.numel():
            ids = ids.unique()
            vals = logits[ids]
            logits[ids] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    return logits


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    """OpenAI ``logit_bias``: each listed token's logit moves by its bias (in place)."""
    ids = torch.tensor(list(bias), dtype=torch.long, device=logits.device)
    logits[ids] += torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    return logits


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Pick the next token from one row of logits: greedy at temperature 0, else top-k/top-p sampling."""
    if params.temperature <= 0.0:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Drop tokens once the mass before them already exceeds top_p (the first token always stays).
        drop = (cum - torch.softmax(sorted_logits, dim=-1)) > params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprobs(logprobs: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """``token``'s entry in one row of log-probabilities, and the ``top`` most likely ``(id, logprob)``, best first."""
    chosen = float(logprobs[token])
    if top <= 0:
        return chosen, []
    values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]))
    return chosen, list(zip(ids.tolist(), values.tolist()))
