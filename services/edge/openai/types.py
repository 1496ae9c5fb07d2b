"""The OpenAI HTTP request bodies the edge accepts, as msgspec Structs.

Only the wire shape lives here (types, defaults); ranges and cross-field rules are checked in
``openai_translate``. Unknown fields are ignored (msgspec's default), as OpenAI clients send
many the platform does not use.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

# Bounded so that an absurd number is a 400 here, not an overflow in an engine.
Int32 = Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31 - 1)]
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class ContentPart(msgspec.Struct, kw_only=True):
    """One part of multi-part message content; only ``text`` parts are supported."""

    type: str
    text: str | None = None


class MessageBody(msgspec.Struct, kw_only=True):
    """One chat message as an OpenAI client sends it."""

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(msgspec.Struct, kw_only=True):
    """``stream_options``: ``include_usage`` adds a final usage chunk to a stream."""

    include_usage: bool = False


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


class ChatCompletionBody(_CommonBody, kw_only=True):
    """``POST /v1/chat/completions``."""

    messages: list[MessageBody]
    max_completion_tokens: Int32 | None = None
    logprobs: Annotated[bool | None, msgspec.Meta(
        description="return each generated token's log-probability (the model's raw distribution)")] = None
    top_logprobs: Annotated[Int32 | None, msgspec.Meta(
        description="0..20 most likely alternatives per token; needs logprobs: true")] = None


class CompletionBody(_CommonBody, kw_only=True):
    """``POST /v1/completions`` (legacy): ``prompt`` is a string or a list of exactly one string."""

    prompt: str | list[str]
    # legacy: the number of alternatives per token (0..5), not a bool
    logprobs: Annotated[Int32 | None, msgspec.Meta(
        description="0..5: return each token's log-probability and that many most likely alternatives")] = None
