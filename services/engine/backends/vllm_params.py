"""Translation between our messages and vLLM's: sampling and structured-output parameters in, logprobs and
errors out, and the adapter configurations vLLM can serve.

Pure functions (vllm imported inside them, only when an engine runs), so the mapping is tested without
starting vLLM; ``vllm.VllmEngine`` is their one user on the serving path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence as Seq

from schemas.errors import BusError, ErrorCode
from schemas.events import TokenLogprob, TopLogprob
from schemas.inference import SamplingParams, StructuredOutput


def vllm_structured(structured: StructuredOutput | None):
    """Our structured-output constraint as vLLM's ``StructuredOutputsParams`` (None: free text).

    The engine runs vLLM's ``guidance`` backend (llguidance, the library the other engines use), so a
    ``grammar`` is Lark there too. JSON is compact, as the other engines write it: vLLM's backends read
    ``disable_any_whitespace`` from the engine's ``StructuredOutputsConfig`` (``start`` sets it), not from
    these per-request params; it is set here too for a vLLM that honours it per request.
    """
    if structured is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    match structured.kind:
        case "json_schema":
            return StructuredOutputsParams(json=structured.json, disable_any_whitespace=True)
        case "json_object":
            return StructuredOutputsParams(json_object=True, disable_any_whitespace=True)
        case "regex":
            return StructuredOutputsParams(regex=structured.regex)
        case "choice":
            return StructuredOutputsParams(choice=list(structured.choice))
        case "grammar":
            return StructuredOutputsParams(grammar=structured.grammar)
    raise BusError(ErrorCode.UNSUPPORTED, f"structured output kind {structured.kind!r} is not supported",
                   param="response_format")


def vllm_sampling(params: SamplingParams, max_tokens: int, structured: StructuredOutput | None = None):
    """Our sampling parameters (and structured-output constraint) as vLLM's, streaming one delta per step."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind

    return VllmSamplingParams(
        max_tokens=max_tokens, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
        seed=params.seed, stop=list(params.stop) or None, presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty, repetition_penalty=params.repetition_penalty,
        output_kind=RequestOutputKind.DELTA, skip_special_tokens=True, logprobs=params.logprobs,
        logit_bias=dict(params.logit_bias) or None, structured_outputs=vllm_structured(structured))


def token_logprobs(token_ids: Seq[int], positions, top: int, token_text: Callable[[int], str]) -> list[TokenLogprob]:
    """vLLM's sample logprobs of one delta (one ``{token id: Logprob}`` per token) as ours.

    vLLM puts the sampled token and the ``top`` best (ranks 1..top) in each position; it reports
    raw log-probabilities (its default ``logprobs_mode``), as the transformers engine does.
    """
    out = []
    for token, position in zip(token_ids, positions):
        position = position or {}

        def text(token_id: int, logprob) -> str:
            return logprob.decoded_token if logprob.decoded_token is not None else token_text(token_id)

        chosen = position.get(token)
        ranked = sorted((lp.rank, tid, lp) for tid, lp in position.items() if lp.rank is not None and lp.rank <= top)
        out.append(TokenLogprob(
            token_id=token, token=text(token, chosen) if chosen is not None else token_text(token),
            logprob=chosen.logprob if chosen is not None else float("nan"),
            top=[TopLogprob(token_id=tid, token=text(tid, lp), logprob=lp.logprob) for _, tid, lp in ranked]))
    return out


def check_lora_config(config: dict, adapter: str, max_rank: int) -> None:
    """vLLM serves plain LoRA up to ``max_rank``; anything else is ``unsupported`` before it reaches the engine."""
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        method = "DoRA" if config.get("use_dora") else config.get("peft_type")
        raise BusError(ErrorCode.UNSUPPORTED, f"adapter {adapter!r} uses {method}; the vllm engine serves only LoRA "
                                              "adapters (use the transformers engine for other PEFT methods)",
                       param="adapter")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise BusError(ErrorCode.INVALID_REQUEST, f"adapter {adapter!r} is broken: 'r' is {rank!r}", param="adapter")
    if rank > max_rank:
        raise BusError(ErrorCode.UNSUPPORTED, f"adapter {adapter!r} has LoRA rank {rank}, above this engine's "
                                              f"maximum {max_rank}", param="adapter")


@contextlib.contextmanager
def translated_errors():
    """vLLM's exceptions inside the block become typed bus errors."""
    from vllm.exceptions import VLLMClientError
    from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

    try:
        yield
    except EngineDeadError as exc:
        raise BusError(ErrorCode.ENGINE_FAILED, f"the vllm engine core died: {exc}") from None
    except VLLMClientError as exc:
        raise BusError(ErrorCode.INVALID_REQUEST, str(exc)) from None
    except ValueError as exc:  # vLLM validates a request (a grammar it cannot compile...) as it is added
        raise BusError(ErrorCode.INVALID_REQUEST, f"vllm refused the request: {exc}") from None
    except EngineGenerateError as exc:
        raise BusError(ErrorCode.ENGINE_FAILED, f"vllm failed the request: {exc.__cause__ or exc}") from None
