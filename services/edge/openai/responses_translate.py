"""Translate a ``/v1/responses`` body into the request chat completions runs. Pure: no aiohttp, no I/O.

The Responses API is a translation at the edge, not a second pipeline: ``translate`` builds the
chat-completions body the request means (``instructions`` as a system message, the conversation
of ``previous_response_id`` then ``input`` as messages, ``max_output_tokens`` as
``max_completion_tokens``, ``text.format`` as ``response_format``, tools through
``responses_tools``) and validates it with ``translate.parse_chat``, so every check, default and
refusal of chat completions applies unchanged; a refusal's ``param`` is mapped back to the
Responses field it came from. ``parse_responses`` is the whole step for a caller without an
HTTP request (a batch line): body in, ``ParsedResponses`` out.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from schemas.errors import BusError, ErrorCode
from schemas.responses import ResponseItem
from services.edge.openai import responses_tools, translate
from services.edge.openai.responses_types import InputItem, InputPart, ResponsesBody
from services.edge.openai.translate import ParsedRequest

MESSAGE_ROLES = frozenset({"user", "assistant", "system", "developer"})
TEXT_PARTS = frozenset({"input_text", "output_text"})
MAX_METADATA = 16  # OpenAI's bounds on ``metadata``
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512

_decoder = msgspec.json.Decoder(ResponsesBody)
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class ParsedResponses:
    """A validated Responses request: what chat completions runs, plus what the response object needs.

    ``input`` are this request's own input items (ids given or made here): stored with the
    response, listed by ``GET /v1/responses/{id}/input_items``, and part of any later request's
    conversation through ``previous_response_id``. ``shown`` are the request fields the response
    object echoes.
    """

    parsed: ParsedRequest
    input: list[ResponseItem]
    previous_response_id: str | None
    store: bool
    shown: dict[str, Any]


def _unsupported(param: str, why: str) -> BusError:
    return BusError(ErrorCode.UNSUPPORTED, f"'{param}' is not supported: {why}", param=param)


def _invalid(message: str, param: str | None) -> BusError:
    return BusError(ErrorCode.INVALID_REQUEST, message, param=param)


def decode_body(raw: bytes | dict[str, Any]) -> ResponsesBody:
    """Decode a body (bytes, or a dict from a batch line); unknown fields are refused by name."""
    body = translate._decode(_decoder, raw if isinstance(raw, bytes) else _encode(raw))
    check_fields(body)
    return body


# Fields refused whenever they are set (not None): (field, why).
_REFUSED_WHEN_SET = (
    ("background_options", "background responses are not served"),
    ("conversation", "conversations are not served; continue one with 'previous_response_id'"),
    ("max_tool_calls", "there are no built-in tools whose calls it would bound"),
    ("prompt", "stored prompt templates are not served; send 'instructions' and 'input'"),
    ("reasoning", "the served models are not reasoning models"),
    ("context_management", "context compaction is not served"),
    ("moderation", "moderation is not served"),
    ("access_programs", "access programs are OpenAI's"),
    ("image", "image inputs are not served"),
)


def check_fields(body: ResponsesBody) -> None:
    """Refuse every field this platform cannot honour, when it is set to something that matters."""
    if body.background:
        raise _unsupported("background", "responses run while the request is open (stream it for progress)")
    for name, why in _REFUSED_WHEN_SET:
        if getattr(body, name) is not None:
            raise _unsupported(name, why)
    if body.include:
        raise _unsupported("include", "no additional output data (logprobs, encrypted reasoning...) is served")
    if body.top_logprobs:
        raise _unsupported("top_logprobs", "log-probabilities are served on /v1/chat/completions")
    if body.truncation not in (None, "disabled"):
        if body.truncation == "auto":
            raise _unsupported("truncation", "'auto' is not served: a conversation longer than the context is a 400")
        raise _invalid(f"'truncation' must be 'auto' or 'disabled', got {body.truncation!r}", "truncation")
    if body.text is not None and body.text.verbosity is not None:
        raise _unsupported("text.verbosity", "the served models have no verbosity control")
    if body.max_output_tokens is not None and body.max_output_tokens < 1:
        raise _invalid(f"'max_output_tokens' must be at least 1, got {body.max_output_tokens}", "max_output_tokens")
    _check_metadata(body.metadata)


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if not metadata:
        return
    if len(metadata) > MAX_METADATA:
        raise _invalid(f"'metadata' may hold at most {MAX_METADATA} pairs", "metadata")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            raise _invalid(f"'metadata' keys are at most {MAX_METADATA_KEY} characters and values at most "
                           f"{MAX_METADATA_VALUE}", "metadata")


def _part_texts(parts: str | list[InputPart] | None, param: str) -> list[str]:
    """The text parts of message content (or a call's output); anything but text is refused."""
    if isinstance(parts, str):
        return [parts]
    if parts is None:
        raise _invalid(f"'{param}' is required", param)
    texts = []
    for j, part in enumerate(parts):
        if part.type in TEXT_PARTS and part.text is not None:
            texts.append(part.text)
        elif part.type == "refusal" and part.refusal is not None:
            texts.append(part.refusal)
        else:
            raise BusError(ErrorCode.UNSUPPORTED, f"only text content parts (input_text, output_text) are served, "
                           f"got type {part.type!r}", param=f"{param}[{j}]")
    return texts


def _item(item: InputItem, param: str) -> ResponseItem:
    """One input item as a ``ResponseItem`` (with an id of its own when the client gave none)."""
    if item.type == "message":
        if item.role not in MESSAGE_ROLES:
            raise _invalid(f"'{param}.role' must be one of {', '.join(sorted(MESSAGE_ROLES))}, got {item.role!r}",
                           f"{param}.role")
        return ResponseItem(id=item.id or f"msg_{uuid.uuid4().hex}", type="message", role=item.role,
                            texts=_part_texts(item.content, f"{param}.content"))
    if item.type == "function_call":
        for name in ("call_id", "name", "arguments"):
            if getattr(item, name) is None:
                raise _invalid(f"'{param}.{name}' is required for a function_call item", f"{param}.{name}")
        return ResponseItem(id=item.id or f"fc_{uuid.uuid4().hex}", type="function_call", call_id=item.call_id,
                            name=item.name, arguments=item.arguments)
    if item.type == "function_call_output":
        if item.call_id is None:
            raise _invalid(f"'{param}.call_id' is required for a function_call_output item", f"{param}.call_id")
        return ResponseItem(id=item.id or f"fco_{uuid.uuid4().hex}", type="function_call_output",
                            call_id=item.call_id, output="\n".join(_part_texts(item.output, f"{param}.output")))
    if item.type == "item_reference":
        raise _unsupported(f"{param}.type", "item references are not served; continue a conversation with "
                                             "'previous_response_id'")
    raise BusError(ErrorCode.UNSUPPORTED, f"input items of type {item.type!r} are not served (message, "
                   "function_call and function_call_output are)", param=f"{param}.type")


def input_items(body: ResponsesBody) -> list[ResponseItem]:
    """The request's ``input`` as items: a string is one user message."""
    if body.input is None or body.input == [] or body.input == "":
        raise _invalid("'input' is required and must not be empty", "input")
    if isinstance(body.input, str):
        return [ResponseItem(id=f"msg_{uuid.uuid4().hex}", type="message", role="user", texts=[body.input])]
    return [_item(item, f"input[{i}]") for i, item in enumerate(body.input)]


def _messages(instructions: str | None, history: Sequence[ResponseItem], items: list[ResponseItem],
              given_as_text: bool) -> tuple[list[dict[str, Any]], list[str]]:
    """The chat messages of the conversation, and for each the Responses field it came from."""
    messages: list[dict[str, Any]] = []
    origins: list[str] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
        origins.append("instructions")
    for origin, group in (("previous_response_id", history), ("input", items)):
        for i, item in enumerate(group):
            param = origin if origin != "input" or given_as_text else f"input[{i}]"
            if item.type == "message":
                messages.append({"role": item.role, "content": "\n".join(item.texts)})
            else:
                responses_tools.call_message(item, messages, param)
            origins.extend([param] * (len(messages) - len(origins)))
    return messages, origins


def _response_format(body: ResponsesBody) -> dict[str, Any] | None:
    """``text.format`` as chat's ``response_format`` (the json_schema fields nested under ``json_schema``)."""
    fmt = body.text.format if body.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.type != "json_schema":
        raise _invalid(f"'text.format.type' must be one of text, json_object, json_schema, got {fmt.type!r}",
                       "text.format.type")
    if not fmt.name:
        raise _invalid("'text.format.name' is required when type is 'json_schema'", "text.format.name")
    schema = {key: getattr(fmt, key) for key in ("name", "description", "schema", "strict")
              if getattr(fmt, key) is not None}
    return {"type": "json_schema", "json_schema": schema}


def _remap(param: str | None, origins: list[str]) -> str | None:
    """A chat field path (``param`` of a chat refusal) as the Responses field it came from."""
    if param is None:
        return None
    if param.startswith("messages["):
        index = int(param[len("messages["):param.index("]")])
        return origins[index] if index < len(origins) else "input"
    if param.startswith("response_format"):
        return "text.format" + param[len("response_format"):].replace(".json_schema", "", 1)
    if param == "max_completion_tokens":
        return "max_output_tokens"
    return param


def chat_body(body: ResponsesBody, history: Sequence[ResponseItem],
              items: list[ResponseItem]) -> tuple[dict[str, Any], list[str]]:
    """The chat-completions body a Responses request means, and each message's Responses field."""
    messages, origins = _messages(body.instructions, history, items, isinstance(body.input, str))
    chat: dict[str, Any] = {"model": body.model, "messages": messages, "stream": bool(body.stream),
                            "priority": body.priority, "cache": body.cache}
    for name, value in (("max_completion_tokens", body.max_output_tokens), ("temperature", body.temperature),
                        ("top_p", body.top_p), ("user", body.user), ("seed", body.seed), ("top_k", body.top_k),
                        ("repetition_penalty", body.repetition_penalty), ("adapter", body.adapter),
                        ("timeout", body.timeout), ("response_format", _response_format(body))):
        if value is not None:
            chat[name] = value
    chat.update(responses_tools.chat_tool_fields(body.tools, body.tool_choice, body.parallel_tool_calls))
    return chat, origins


def _shown(body: ResponsesBody, store: bool) -> dict[str, Any]:
    """The request fields the response object echoes (OpenAI's defaults where the request left them out)."""
    fmt = body.text.format if body.text is not None else None
    return {
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "temperature": body.temperature if body.temperature is not None else 1.0,
        "top_p": body.top_p if body.top_p is not None else 1.0,
        "text": {"format": msgspec.to_builtins(fmt) if fmt is not None else {"type": "text"}},
        "tools": body.tools or [], "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",
        "parallel_tool_calls": body.parallel_tool_calls if body.parallel_tool_calls is not None else True,
        "previous_response_id": body.previous_response_id, "metadata": body.metadata or {}, "store": store,
        "truncation": "disabled", "user": body.user, "background": False,
        "reasoning": {"effort": None, "summary": None},
    }


def translate_body(body: ResponsesBody, history: Sequence[ResponseItem] = (), *,
                   default_max_tokens: int = 256) -> ParsedResponses:
    """A decoded body (``history``: the conversation its ``previous_response_id`` names) as a ``ParsedResponses``."""
    items = input_items(body)
    chat, origins = chat_body(body, history, items)
    try:
        parsed = translate.parse_chat(_encode(chat), default_max_tokens=default_max_tokens, max_n=1)
    except BusError as err:
        raise BusError(err.code, err.message, param=_remap(err.param, origins), retry_after=err.retry_after) from None
    store = body.store if body.store is not None else True
    return ParsedResponses(parsed=parsed, input=items, previous_response_id=body.previous_response_id, store=store,
                           shown=_shown(body, store))


def parse_responses(raw: bytes | dict[str, Any], history: Sequence[ResponseItem] = (), *,
                    default_max_tokens: int = 256) -> ParsedResponses:
    """Decode, validate and translate a ``/v1/responses`` body in one step (no HTTP request needed).

    ``history`` is the conversation ``previous_response_id`` names, already loaded
    (``ResponseStore.conversation``); a caller that cannot load it passes none.
    """
    return translate_body(decode_body(raw), history, default_max_tokens=default_max_tokens)
