"""The ``POST /v1/responses`` request body, as msgspec Structs (OpenAI's Responses API).

Only the wire shape lives here; ``responses_translate`` checks values and maps the body onto the
chat-completions request. Every OpenAI field of the create call is listed, and any other is
refused (``forbid_unknown_fields``: a 400 ``unsupported`` naming it); ``responses_translate``
decides which are honoured, refused or documented no-ops.
"""

from __future__ import annotations

from typing import Any

import msgspec

from services.edge.openai.types import Int32, Int64


class InputPart(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One content part of an input message: ``input_text`` / ``output_text`` are served, the rest refused.

    The image, file and audio fields are listed so that such a part is refused for its type, not
    for an unknown field.
    """

    type: str
    text: str | None = None
    annotations: list[Any] | None = None  # output_text passed back: no-op
    logprobs: list[Any] | None = None  # output_text passed back: no-op
    refusal: str | None = None
    image_url: str | None = None
    file_id: str | None = None
    file_data: str | None = None
    file_url: str | None = None
    filename: str | None = None
    detail: str | None = None
    input_audio: Any = None


class InputItem(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One item of ``input``: a message (``type`` may be left out), a ``function_call`` or its output."""

    type: str = "message"
    role: str | None = None
    content: str | list[InputPart] | None = None
    id: str | None = None
    status: str | None = None
    phase: str | None = None  # an output message passed back: no-op
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[InputPart] | None = None
    namespace: str | None = None


class TextFormat(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``text.format``: ``text``, ``json_object`` or ``json_schema`` (``name``, ``schema``, ``strict`` flattened in)."""

    type: str
    name: str | None = None
    description: str | None = None
    schema: dict[str, Any] | bool | None = None
    strict: bool | None = None


class TextConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``text``: the output's format; ``verbosity`` is refused (no served model has such a control)."""

    format: TextFormat | None = None
    verbosity: str | None = None


class ResponsesStreamOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``stream_options``: ``include_obfuscation`` is a no-op (deltas carry no padding field here)."""

    include_obfuscation: bool | None = None


class ResponsesBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/responses``; see ``responses_translate`` and the README for what each field does."""

    model: str
    input: str | list[InputItem] | None = None
    instructions: str | None = None
    max_output_tokens: Int32 | None = None
    temperature: float | None = None
    top_p: float | None = None
    text: TextConfig | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    stream: bool | None = None
    stream_options: ResponsesStreamOptions | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    # Accepted, documented no-ops: they cannot change the answer.
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    truncation: str | None = None  # "disabled" (OpenAI's default) accepted; "auto" refused
    # Refused with 400 unsupported when set to something that matters.
    background: bool | None = None
    background_options: dict[str, Any] | None = None
    conversation: Any = None
    include: list[str] | None = None
    max_tool_calls: Int32 | None = None
    prompt: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    top_logprobs: Int32 | None = None
    context_management: list[Any] | None = None
    moderation: dict[str, Any] | None = None
    access_programs: dict[str, Any] | None = None
    image: dict[str, Any] | None = None
    # Platform extras, as on /v1/chat/completions.
    seed: Int64 | None = None
    top_k: Int32 | None = None
    repetition_penalty: float | None = None
    priority: Int32 = 0
    adapter: str | None = None
    timeout: float | None = None
    cache: bool = True  # false: never answered from, nor stored in, the prompt cache
