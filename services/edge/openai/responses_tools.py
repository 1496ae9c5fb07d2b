"""Function calling in the Responses API, as chat completions' tool calling. Pure.

Everything the Responses API does with tools is a translation into (and out of) the chat
shape, kept in this one module:

- ``chat_tool_fields``: ``tools`` (``{type: function, name, description, parameters, strict}``),
  ``tool_choice`` and ``parallel_tool_calls`` into the chat body's ``tools``
  (``{type: function, function: {...}}``), ``tool_choice`` and ``parallel_tool_calls``. Chat
  decides what it serves (the same refusals, e.g. tools with ``text.format``).
- ``call_message``: ``function_call`` / ``function_call_output`` items into an assistant
  message's ``tool_calls`` / a ``tool`` message.

The answer's calls become ``function_call`` output items in ``responses_body.ResponseDraft``.
"""

from __future__ import annotations

from typing import Any

from schemas.errors import BusError, ErrorCode
from schemas.responses import ResponseItem

_FUNCTION_KEYS = frozenset({"type", "name", "description", "parameters", "strict"})


def _unsupported(message: str, param: str) -> BusError:
    return BusError(ErrorCode.UNSUPPORTED, message, param=param)


def _invalid(message: str, param: str) -> BusError:
    return BusError(ErrorCode.INVALID_REQUEST, message, param=param)


def _chat_tool(tool: dict[str, Any], i: int) -> dict[str, Any]:
    """One Responses function tool in chat's shape."""
    if tool.get("type") != "function":
        raise _unsupported(f"tools[{i}]: only 'function' tools are served, got type {tool.get('type')!r} "
                           "(hosted tools such as web or file search are not available)", f"tools[{i}].type")
    unknown = sorted(set(tool) - _FUNCTION_KEYS)
    if unknown:
        raise _unsupported(f"unknown request field 'tools[{i}].{unknown[0]}'", f"tools[{i}].{unknown[0]}")
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise _invalid(f"'tools[{i}].name' must be a non-empty string", f"tools[{i}].name")
    function = {key: tool[key] for key in ("name", "description", "parameters", "strict") if tool.get(key) is not None}
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: Any) -> Any:
    """``tool_choice`` in chat's shape: the modes unchanged, a named function under ``function``."""
    if choice is None or isinstance(choice, str):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise _unsupported("'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", \"name\": ...}",
                       "tool_choice")


def chat_tool_fields(tools: list[dict[str, Any]] | None, tool_choice: Any,
                     parallel_tool_calls: bool | None) -> dict[str, Any]:
    """The chat body fields for a Responses request's ``tools``, ``tool_choice`` and ``parallel_tool_calls``."""
    out: dict[str, Any] = {}
    if tools:
        out["tools"] = [_chat_tool(tool, i) for i, tool in enumerate(tools)]
    if tool_choice is not None:
        out["tool_choice"] = _chat_tool_choice(tool_choice)
    if parallel_tool_calls is not None:
        out["parallel_tool_calls"] = parallel_tool_calls
    return out


def call_message(item: ResponseItem, messages: list[dict[str, Any]], param: str) -> None:
    """Append a ``function_call`` / ``function_call_output`` item to chat ``messages``.

    Consecutive calls join one assistant message (parallel tool calls), as chat has them.
    """
    if item.type == "function_call_output":
        messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        return
    call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
    last = messages[-1] if messages else None
    if last is not None and last.get("role") == "assistant" and last.get("tool_calls") and not last.get("content"):
        last["tool_calls"].append(call)
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
