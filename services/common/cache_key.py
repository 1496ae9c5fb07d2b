"""The prompt cache's key and its eligibility rule. Pure: no I/O.

Shared by the two places that answer from the cache (KV ``llm_prompt_cache``): the edge, for
the HTTP requests it can answer itself, and the scheduler, for everything that reaches the
queue. Both must compute the same key for the same request, so both use this module.

The key is SHA-256 (hex) over the msgspec JSON of ``CacheKeyInput``: the request kind (chat or
completion), the canonical model id, the adapter, the prompt or messages, every field of
``SamplingParams`` and the structured-output constraint (``response_format``...). The struct lists its fields in a fixed order and encodes defaults too, so
two requests differing in any one of them never share a key, and a field added to
``SamplingParams`` later is keyed automatically (``sampling`` is encoded whole).
"""

from __future__ import annotations

import hashlib

import msgspec

from schemas.inference import ChatMessage, InferenceRequest, SamplingParams, StructuredOutput

# Bump when the encoding changes, so old entries are never read as new ones (2: structured output, logit_bias).
KEY_VERSION = 2


class _KeySampling(SamplingParams, kw_only=True, omit_defaults=False):
    """``SamplingParams`` with every field encoded, defaults included."""


class CacheKeyInput(msgspec.Struct, kw_only=True, omit_defaults=False, array_like=True):
    """Everything that changes a response, in a fixed order (array-encoded: no key-order ambiguity)."""

    version: int
    kind: str
    model: str
    adapter: str
    prompt: str | None
    messages: list[tuple[str, str, str | None]] | None
    sampling: _KeySampling
    structured: StructuredOutput | None


_encoder = msgspec.json.Encoder()


def is_deterministic(sampling: SamplingParams) -> bool:
    """Greedy decoding (temperature 0) or a fixed seed: the same request gives the same answer."""
    return sampling.temperature == 0 or sampling.seed is not None


def is_cacheable(req: InferenceRequest) -> bool:
    """Whether ``req`` may be answered from, and stored in, the prompt cache.

    A migrated request (``continuation`` set) never is: its engine produces only the rest of a
    response, which must not be stored or found under the whole request's key. Nor is one asking
    for ``logprobs``: the cache stores text only. (``n`` > 1 needs no rule: the edge fans it out
    into requests with ``n`` 1 and a seed of their own each, ``seed + i``.)
    """
    return (req.cache and not req.continuation and req.sampling.logprobs is None
            and is_deterministic(req.sampling))


def _messages(messages: list[ChatMessage] | None) -> list[tuple[str, str, str | None]] | None:
    if messages is None:
        return None
    return [(m.role, m.content, m.name) for m in messages]


# The sampling fields whose default is a float (computed once: this runs for every request).
_FLOAT_FIELDS = frozenset(name for name in SamplingParams.__struct_fields__
                          if isinstance(getattr(SamplingParams(), name), float))


def _normalised(sampling: SamplingParams) -> _KeySampling:
    """Every sampling field, with floats as floats (``0`` and ``0.0`` give the same key)."""
    values = msgspec.structs.asdict(sampling)
    for name in _FLOAT_FIELDS:
        if isinstance(values[name], int):
            values[name] = float(values[name])
    values["stop"] = list(sampling.stop)
    values["logit_bias"] = {token: float(bias) for token, bias in sorted(sampling.logit_bias.items())}
    return _KeySampling(**values)


def key_input(req: InferenceRequest, model: str | None = None) -> CacheKeyInput:
    """The canonical key material of ``req``; ``model`` is the canonical id its name resolved to, if known."""
    return CacheKeyInput(version=KEY_VERSION, kind="chat" if req.messages is not None else "completion",
                         model=model or req.model, adapter=req.adapter or "", prompt=req.prompt,
                         messages=_messages(req.messages), sampling=_normalised(req.sampling),
                         structured=req.structured)


def cache_key(req: InferenceRequest, model: str | None = None) -> str:
    """SHA-256 (hex) of ``key_input(req, model)``: a valid NATS KV key."""
    return hashlib.sha256(_encoder.encode(key_input(req, model))).hexdigest()
