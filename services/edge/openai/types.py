"""The OpenAI HTTP request bodies the edge accepts, as msgspec Structs.

Only the wire shape lives here (types, defaults); ranges and cross-field rules are checked in
``openai_translate``. The OpenAI bodies list every field of OpenAI's API, and refuse any other
(``forbid_unknown_fields``: a field the edge does not know is a 400 ``unsupported`` naming it,
never silently ignored); ``openai.fields`` decides which are honoured, refused or no-ops.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

# Bounded so that an absurd number is a 400 here, not an overflow in an engine.
Int32 = Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31 - 1)]
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class ContentPart(msgspec.Struct, kw_only=True):
    """One part of multi-part message content; only ``text`` parts are supported."""

    type: str
    text: str | None = None


class FunctionCallBody(msgspec.Struct, kw_only=True):
    """A call's function in an assistant message: its name and its arguments as JSON text."""

    name: str
    arguments: str = "{}"


class ToolCallBody(msgspec.Struct, kw_only=True):
    """One tool call an assistant message carries (a call the model made earlier in the chat)."""

    id: str | None = None
    type: str = "function"
    function: FunctionCallBody


class MessageBody(msgspec.Struct, kw_only=True):
    """One chat message as an OpenAI client sends it (an assistant's ``tool_calls`` or legacy ``function_call``,
    a tool's ``tool_call_id``, a legacy ``function`` message's ``name``)."""

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallBody] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCallBody | None = None  # the legacy form of one call (an assistant message)


class FunctionBody(msgspec.Struct, kw_only=True):
    """A function a tool offers: its name, description and arguments' JSON Schema (``strict`` is always on)."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolBody(msgspec.Struct, kw_only=True):
    """One entry of ``tools``: only ``function`` tools are served."""

    type: str
    function: FunctionBody | None = None


class NamedFunction(msgspec.Struct, kw_only=True):
    """The ``function`` of a named ``tool_choice``."""

    name: str


class ToolChoiceBody(msgspec.Struct, kw_only=True):
    """A named ``tool_choice``: ``{"type": "function", "function": {"name": ...}}``."""

    type: str
    function: NamedFunction | None = None


class StreamOptions(msgspec.Struct, kw_only=True):
    """``stream_options``: ``include_usage`` adds a final usage chunk to a stream."""

    include_usage: bool = False


class JsonSchemaFormat(msgspec.Struct, kw_only=True):
    """``response_format.json_schema``: the schema the answer must validate against (``strict`` is always on)."""

    name: str
    description: str | None = None
    schema: dict[str, Any] | bool | None = None
    strict: bool | None = None


class ResponseFormat(msgspec.Struct, kw_only=True):
    """``response_format``: ``text``, ``json_object`` or ``json_schema`` (with ``json_schema``)."""

    type: str
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """vLLM's ``structured_outputs`` extra: exactly one of a JSON schema, a regex, a choice list, a grammar."""

    json: dict[str, Any] | bool | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None


class SamplingFields(msgspec.Struct, kw_only=True):
    """The sampling fields every request body shares (OpenAI's and the native API's ``generation``)."""

    temperature: float | None = None
    top_p: float | None = None
    n: Annotated[Int32 | None, msgspec.Meta(
        description="choices to generate (1..the edge's max_choices, 16 by default); each is generated as a "
                    "request of its own, choice i with seed + i when a seed is given")] = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: Int64 | None = None
    # platform extras
    top_k: Int32 | None = None
    repetition_penalty: float | None = None


class _CommonBody(SamplingFields, kw_only=True):
    """Fields shared by chat and legacy completion requests, OpenAI's plus the platform's extras."""

    model: str
    max_tokens: Int32 | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    priority: Int32 = 0
    adapter: str | None = None
    timeout: float | None = None
    cache: bool = True  # false: never answered from, nor stored in, the prompt cache
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsBody | None = None  # vLLM's extra


class ChatCompletionBody(_CommonBody, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/chat/completions``; see ``openai.fields`` for what each OpenAI field does here."""

    messages: list[MessageBody]
    # Tool calling (``openai.tools``); the legacy ``functions`` / ``function_call`` map onto it.
    tools: list[ToolBody] | None = None
    tool_choice: str | ToolChoiceBody | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionBody] | None = None
    function_call: str | NamedFunction | None = None
    # Refused with 400 unsupported when they would change the answer (``openai.fields``).
    modalities: list[str] | None = None
    audio: Any = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: Any = None
    # Accepted, documented no-ops: they cannot change the answer.
    prediction: Any = None
    service_tier: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    max_completion_tokens: Int32 | None = None
    logprobs: Annotated[bool | None, msgspec.Meta(
        description="return each generated token's log-probability (the model's raw distribution)")] = None
    top_logprobs: Annotated[Int32 | None, msgspec.Meta(
        description="0..20 most likely alternatives per token; needs logprobs: true")] = None


class CompletionBody(_CommonBody, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/completions`` (legacy): ``prompt`` is a string or a list of exactly one string."""

    prompt: str | list[str]
    # legacy: the number of alternatives per token (0..5), not a bool
    logprobs: Annotated[Int32 | None, msgspec.Meta(
        description="0..5: return each token's log-probability and that many most likely alternatives")] = None
    echo: bool | None = None
    best_of: Int32 | None = None
    suffix: str | None = None
