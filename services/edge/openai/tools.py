"""Tool calling at the edge: an OpenAI chat body's ``tools`` / ``tool_choice`` / messages into the request. Pure.

``plan_tools`` is the one translation (the Responses and Batch APIs reuse it through the chat
path): it checks the tools, renders them and any earlier calls and results into plain chat
messages (``services.common.tool_format``: the one format engines and the trainer share) and
picks the constraint ``tool_choice`` asks for:

- ``none``: the tools are listed in the prompt, the answer is free text and is not read for calls;
- ``auto`` (the default with tools): free text, or text then calls; once the model writes
  ``<tool_call>`` the grammar holds every call to a listed function's schema;
- ``required``: one call (1..8 with ``parallel_tool_calls``, the default) of any listed function;
- ``{"type": "function", "function": {"name": ...}}``: the same, of that function only.

Every mode but ``none`` is a ``grammar`` constraint, so an engine that cannot constrain
refuses it (``unsupported``) like any ``response_format``, and the scheduler tries another.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from schemas.errors import BusError, ErrorCode
from schemas.inference import ChatMessage, StructuredOutput
from services.common import tool_format
from services.common.tool_format import Call, Function
from services.edge.openai.structured import MAX_SCHEMA_BYTES, check_schema
from services.edge.openai.types import ChatCompletionBody, ToolBody, ToolChoiceBody

MAX_TOOLS = 128  # OpenAI's bound on ``tools``
MAX_GRAMMAR_BYTES = 4 * MAX_SCHEMA_BYTES
MODES = ("none", "auto", "required")


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """What tools change in a request: the constraint, and whether the answer is read for calls."""

    functions: list[Function]
    structured: StructuredOutput | None
    read_calls: bool


def _invalid(message: str, param: str) -> BusError:
    return BusError(ErrorCode.INVALID_REQUEST, message, param=param)


def _function(tool: ToolBody, i: int) -> Function:
    at = f"tools[{i}]"
    if tool.type != "function":
        raise BusError(ErrorCode.UNSUPPORTED, f"'{at}.type' {tool.type!r} is not supported: only 'function' tools "
                       "are served", param=f"{at}.type")
    if tool.function is None:
        raise _invalid(f"'{at}.function' is required for a function tool", f"{at}.function")
    fn = tool.function
    if not tool_format.NAME.match(fn.name):
        raise _invalid(f"'{at}.function.name' must be 1-64 letters, digits, '_' or '-', got {fn.name!r}",
                       f"{at}.function.name")
    parameters = fn.parameters if fn.parameters is not None else dict(tool_format.NO_PARAMETERS)
    check_schema(parameters, f"{at}.function.parameters")
    return Function(fn.name, fn.description or "", parameters)


def functions(tools: list[ToolBody] | None) -> list[Function]:
    """The checked functions of ``tools`` (names unique, schemas inside the constrained subset)."""
    if not tools:
        return []
    if len(tools) > MAX_TOOLS:
        raise _invalid(f"'tools' may hold at most {MAX_TOOLS} tools, got {len(tools)}", "tools")
    out = [_function(tool, i) for i, tool in enumerate(tools)]
    seen: set[str] = set()
    for i, fn in enumerate(out):
        if fn.name in seen:
            raise _invalid(f"function name {fn.name!r} appears twice in 'tools'", f"tools[{i}].function.name")
        seen.add(fn.name)
    return out


def _choice(choice: str | ToolChoiceBody | None, fns: list[Function]) -> tuple[str, list[Function]]:
    """The mode (none, auto, required) and the functions a call may name."""
    if choice is None:
        return ("auto" if fns else "none"), fns
    if isinstance(choice, str):
        if choice not in MODES:
            raise _invalid(f"'tool_choice' must be one of none, auto, required or a named function, got {choice!r}",
                           "tool_choice")
        if choice != "none" and not fns:
            raise _invalid(f"'tool_choice' {choice!r} needs 'tools'", "tool_choice")
        return choice, fns
    if choice.type != "function" or choice.function is None:
        raise BusError(ErrorCode.UNSUPPORTED, "'tool_choice' must name a function: "
                       '{"type": "function", "function": {"name": ...}}', param="tool_choice")
    named = [fn for fn in fns if fn.name == choice.function.name]
    if not named:
        raise _invalid(f"'tool_choice' names {choice.function.name!r}, which is not in 'tools'",
                       "tool_choice.function.name")
    return "required", named


def plan_tools(body: ChatCompletionBody, has_constraint: bool = False) -> ToolPlan:
    """The tools of ``body`` (see the module docstring); ``has_constraint``: a ``response_format`` is set too."""
    fns = functions(body.tools)
    mode, callable_fns = _choice(body.tool_choice, fns)
    if mode == "none":
        return ToolPlan(fns, None, False)
    if has_constraint:
        raise BusError(ErrorCode.UNSUPPORTED, "'response_format' (or 'structured_outputs') together with tool calls "
                       "is not supported; set 'tool_choice' to 'none' or leave the format out", param="response_format")
    if body.logprobs:
        raise BusError(ErrorCode.UNSUPPORTED, "'logprobs' together with tool calls is not supported",
                       param="logprobs")
    parallel = body.parallel_tool_calls is not False
    grammar = tool_format.tool_grammar(callable_fns, required=mode == "required", parallel=parallel)
    if len(grammar.encode()) > MAX_GRAMMAR_BYTES:
        raise _invalid(f"the tools' schemas are larger than {MAX_GRAMMAR_BYTES} bytes together", "tools")
    return ToolPlan(fns, StructuredOutput(kind="grammar", grammar=grammar), True)


def _calls(message, i: int) -> list[Call]:
    calls = []
    for j, call in enumerate(message.tool_calls or []):
        if call.type != "function":
            raise BusError(ErrorCode.UNSUPPORTED, f"only function tool calls are supported, got {call.type!r}",
                           param=f"messages[{i}].tool_calls[{j}].type")
        try:
            json.loads(call.function.arguments or "{}")
        except ValueError:
            raise _invalid("a tool call's 'arguments' must be JSON text", f"messages[{i}].tool_calls[{j}].function"
                           ".arguments") from None
        calls.append(Call(call.function.name, call.function.arguments))
    if calls and message.role != "assistant":
        raise _invalid("only assistant messages may carry 'tool_calls'", f"messages[{i}].tool_calls")
    return calls


def render(messages: list[ChatMessage], bodies: list, fns: list[Function]) -> list[ChatMessage]:
    """``messages`` (content already flattened) with the tools section and earlier calls written in."""
    dicts = [{"role": m.role, "content": m.content, "name": m.name, "tool_calls": _calls(b, i)}
             for i, (m, b) in enumerate(zip(messages, bodies))]
    if not fns and not any(d["tool_calls"] for d in dicts):
        return messages
    return [ChatMessage(role=d["role"], content=d["content"], name=d.get("name"))
            for d in tool_format.render_messages(dicts, fns)]
