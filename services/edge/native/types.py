"""Request bodies of the native API of the seed documents (``/api/v1/inference``)."""

from __future__ import annotations

import msgspec

from services.edge.openai.types import Int32, MessageBody, ResponseFormat, SamplingFields, ToolBody, ToolChoiceBody


class NativeGeneration(SamplingFields, kw_only=True):
    """``generation``: the seed documents' sampling block (HF ``generate`` names)."""

    max_new_tokens: Int32 | None = None
    logit_bias: dict[str, float] | None = None


class NativeInferenceBody(msgspec.Struct, kw_only=True):
    """``POST /api/v1/inference[/stream]``: ``modelId`` (or ``model_id`` / ``model``) and ``prompt`` or ``messages``."""

    modelId: str | None = None
    model_id: str | None = None
    model: str | None = None
    prompt: str | None = None
    messages: list[MessageBody] | None = None
    generation: NativeGeneration = msgspec.field(default_factory=NativeGeneration)
    priority: Int32 = 0
    adapter: str | None = None
    timeout: float | None = None
    cache: bool = True
    user: str | None = None
    # OpenAI's ``response_format`` (text, json_object, json_schema), enforced by constrained decoding.
    responseFormat: ResponseFormat | None = None
    # OpenAI's function tools (``docs/tools.md``), with ``messages`` only; answers carry ``toolCalls``.
    tools: list[ToolBody] | None = None
    toolChoice: str | ToolChoiceBody | None = None  # none, auto, required or {"type": "function", "function": ...}
    parallelToolCalls: bool | None = None
