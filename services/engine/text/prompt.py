"""What the model sees for a request: chat template or raw prompt, then a migrated answer so far.

Shared by every backend that tokenizes on our side (transformers, vLLM, TensorRT-LLM, MindIE,
MLX), so they all render a request alike (llama.cpp applies its GGUF's own template).
``tokenizer`` is anything with a Hugging Face tokenizer's ``encode``/``apply_chat_template``/
``chat_template`` (mlx_lm's ``TokenizerWrapper`` forwards them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from schemas.errors import BusError, ErrorCode
from schemas.inference import InferenceRequest


@dataclass(slots=True)
class RenderedPrompt:
    """Token ids to feed the engine, and how many of them are a failover continuation (not billed as prompt)."""

    ids: list[int]
    continued: int = 0

    @property
    def billed(self) -> int:
        """Prompt tokens reported in usage: the prompt without the continuation."""
        return len(self.ids) - self.continued


def _chat_ids(tokenizer, request: InferenceRequest, add_generation_prompt: bool) -> list[int]:
    messages = [{"role": m.role, "content": m.content} for m in request.messages or []]
    if getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        # transformers 5 returns a BatchEncoding; older versions and mlx_lm a plain list.
        return list(enc["input_ids"] if hasattr(enc, "keys") else enc)
    text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    return list(tokenizer.encode(text + "\nassistant:" if add_generation_prompt else text))


def render_prompt(tokenizer, request: InferenceRequest, add_generation_prompt: bool = True) -> RenderedPrompt:
    """The chat template for messages, the raw prompt for completions, then ``request.continuation``.

    ``add_generation_prompt`` false leaves the assistant header off (only ``/tokenize`` asks for that).
    """
    if request.messages is not None:
        ids = _chat_ids(tokenizer, request, add_generation_prompt)
    else:
        ids = list(tokenizer.encode(request.prompt or ""))
    continued = 0
    if request.continuation:
        extra = list(tokenizer.encode(request.continuation, add_special_tokens=False))
        ids += extra
        continued = len(extra)
    return RenderedPrompt(ids, continued)


def check_context(prompt_tokens: int, context_length: int) -> None:
    """A prompt of no tokens, or one that leaves no room to generate, is a typed error before it reaches the engine.

    A tokenizer that adds no BOS (SmolLM2's) renders ``""`` as no tokens at all, which the model cannot
    start from (torch fails on the empty input): that is the caller's bad input, not an engine failure.
    """
    if prompt_tokens == 0:
        raise BusError(ErrorCode.INVALID_REQUEST, "the prompt is empty: give at least one token to start from",
                       param="prompt")
    if context_length and prompt_tokens >= context_length:
        raise BusError(ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                       f"this model's maximum context length is {context_length} tokens, "
                       f"but the prompt has {prompt_tokens} tokens", param="messages")


def config_context_length(model_dir) -> int:
    """``max_position_embeddings`` (or a known alias) from a Hugging Face ``config.json``; 0 when absent."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return 0
    for key in ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions"):
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, int) and value > 0:
            return value
    return 0


def decode_ids(tokenizer, tokens: list[int]) -> str:
    """The text of ``tokens`` as a Hugging Face tokenizer decodes them (special tokens kept, as vLLM's
    ``/detokenize`` does); an id outside the vocabulary is ``invalid_request``."""
    size = len(tokenizer)
    if bad := [t for t in tokens if t < 0 or t >= size]:
        raise BusError(ErrorCode.INVALID_REQUEST, f"token {bad[0]} is outside the model's vocabulary of {size} "
                       "tokens", param="tokens")
    return tokenizer.decode(tokens)


class HfTokenizing:
    """``/tokenize`` and ``/detokenize`` for a backend holding a Hugging Face ``tokenizer`` (transformers, vLLM)."""

    tokenizer = None

    async def tokenize(self, request: InferenceRequest, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``request`` as ``generate`` renders them (``/tokenize``)."""
        if self.tokenizer is None:
            raise BusError(ErrorCode.ENGINE_FAILED, "engine not started")
        return render_prompt(self.tokenizer, request, add_generation_prompt).ids

    async def detokenize(self, tokens: list[int]) -> str:
        """The text of ``tokens`` (``/detokenize``); an id outside the vocabulary is ``invalid_request``."""
        if self.tokenizer is None:
            raise BusError(ErrorCode.ENGINE_FAILED, "engine not started")
        return decode_ids(self.tokenizer, tokens)
