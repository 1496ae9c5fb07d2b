"""What the edge does with each OpenAI request field that is not a plain sampling parameter. Pure.

Every field is honoured, refused with 400 ``unsupported`` naming it, or accepted as a no-op
that cannot change the answer (the README's field table lists them all). Fields the edge does
not know at all are refused by the body decoder (``forbid_unknown_fields``).
"""

from __future__ import annotations

from schemas.errors import BusError, ErrorCode
from services.edge.openai.types import ChatCompletionBody, CompletionBody

# Accepted and ignored: they change billing, storage or routing at OpenAI, never the answer.
NO_OP = ("prediction", "service_tier", "store", "metadata", "safety_identifier", "prompt_cache_key",
         "prompt_cache_retention", "user")
MAX_LOGIT_BIAS = 1024  # entries in one logit_bias map
_TOKEN_LIMIT = 2**31


def _refuse(param: str, why: str) -> BusError:
    return BusError(ErrorCode.UNSUPPORTED, f"'{param}' is not supported: {why}", param=param)


def check_chat_fields(body: ChatCompletionBody) -> None:
    """Refuse every chat field this platform cannot honour, when it is set to something that matters."""
    if body.modalities is not None and any(m != "text" for m in body.modalities):
        raise _refuse("modalities", "only the 'text' modality is served")
    if body.audio is not None:
        raise _refuse("audio", "audio output is not served")
    if body.reasoning_effort is not None:
        raise _refuse("reasoning_effort", "the served models are not reasoning models")
    if body.verbosity is not None:
        raise _refuse("verbosity", "the served models have no verbosity control")
    if body.web_search_options is not None:
        raise _refuse("web_search_options", "web search is not available")


def check_completion_fields(body: CompletionBody) -> None:
    """Refuse the legacy completion fields this platform cannot honour."""
    if body.echo:
        raise _refuse("echo", "the prompt is not echoed back")
    if body.best_of is not None and body.best_of != 1:
        raise _refuse("best_of", "server-side best-of selection is not available; use 'n' and pick client-side")
    if body.suffix:
        raise _refuse("suffix", "insertion (fill-in-the-middle) is not available")


def logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI ``logit_bias`` (token id as a string -> -100..100) as the bus carries it."""
    if not bias:
        return {}
    if len(bias) > MAX_LOGIT_BIAS:
        raise BusError(ErrorCode.INVALID_REQUEST, f"'logit_bias' may hold at most {MAX_LOGIT_BIAS} entries",
                       param="logit_bias")
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token < _TOKEN_LIMIT or not key.strip().isdigit():
            raise BusError(ErrorCode.INVALID_REQUEST, f"'logit_bias' keys must be token ids, got {key!r}",
                           param="logit_bias")
        if not -100 <= value <= 100:
            raise BusError(ErrorCode.INVALID_REQUEST, f"'logit_bias' values must be in [-100, 100], got {value!r} "
                           f"for token {token}", param="logit_bias")
        out[token] = float(value)
    return out
