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

The legacy ``functions`` / ``function_call`` (``"none"``, ``"auto"``, ``{"name": ...}``) are the
same tools and choice, never with parallel calls (OpenAI's legacy calls are one at a time); the
answer is then shown in the legacy shape (``ToolPlan.legacy``). Under ``auto`` a JSON
``response_format`` is composed with the calls: the answer is either JSON valid against it or
calls; under ``required`` or a named function it applies to nothing and is accepted.

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
from services.edge.openai.types import ChatCompletionBody, NamedFunction, ToolBody, ToolChoiceBody

MAX_TOOLS = 128  # OpenAI's bound on ``tools``
MAX_GRAMMAR_BYTES = 4 * MAX_SCHEMA_BYTES
MODES = ("none", "auto", "required")
LEGACY_MODES = ("none", "auto")
_ANY_OBJECT = '{"type":"object"}'


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """What tools change in a request: the constraint, and whether the answer is read for calls."""

    functions: list[Function]
    structured: StructuredOutput | None
    read_calls: bool
    legacy: bool = False  # asked with ``functions``: the answer shows ``function_call``


@dataclass(frozen=True, slots=True)
class _Asked:
    """The tools, choice and parallelism a body asks for, in either the current or the legacy form."""

    tools: list[ToolBody] | None
    choice: str | ToolChoiceBody | None
    parallel: bool
    legacy: bool


def _invalid(message: str, param: str) -> BusError:
    return BusError(ErrorCode.INVALID_REQUEST, message, param=param)


def _function(tool: ToolBody, i: int, legacy: bool) -> Function:
    at = f"tools[{i}]"
    if legacy:
        at = f"functions[{i}]"
    elif tool.type != "function":
        raise BusError(ErrorCode.UNSUPPORTED, f"'{at}.type' {tool.type!r} is not supported: only 'function' tools "
                       "are served", param=f"{at}.type")
    if tool.function is None:
        raise _invalid(f"'{at}.function' is required for a function tool", f"{at}.function")
    fn, at = tool.function, at if legacy else f"{at}.function"
    if not tool_format.NAME.match(fn.name):
        raise _invalid(f"'{at}.name' must be 1-64 letters, digits, '_' or '-', got {fn.name!r}", f"{at}.name")
    parameters = fn.parameters if fn.parameters is not None else dict(tool_format.NO_PARAMETERS)
    check_schema(parameters, f"{at}.parameters")
    return Function(fn.name, fn.description or "", parameters)


def functions(tools: list[ToolBody] | None, legacy: bool = False) -> list[Function]:
    """The checked functions of ``tools`` (names unique, schemas inside the constrained subset)."""
    where = "functions" if legacy else "tools"
    if not tools:
        return []
    if len(tools) > MAX_TOOLS:
        raise _invalid(f"'{where}' may hold at most {MAX_TOOLS} entries, got {len(tools)}", where)
    out = [_function(tool, i, legacy) for i, tool in enumerate(tools)]
    seen: set[str] = set()
    for i, fn in enumerate(out):
        if fn.name in seen:
            raise _invalid(f"function name {fn.name!r} appears twice in '{where}'",
                           f"functions[{i}].name" if legacy else f"tools[{i}].function.name")
        seen.add(fn.name)
    return out


def _asked(body: ChatCompletionBody) -> _Asked:
    """The tools of ``body``; the legacy ``functions`` / ``function_call`` as tools, one call at a time."""
    # ``function_call: "none"`` without ``functions`` offers nothing to call: accepted as before, a no-op.
    if body.functions is None and body.function_call in (None, "none"):
        return _Asked(body.tools, body.tool_choice, body.parallel_tool_calls is not False, False)
    if body.tools is not None or body.tool_choice is not None:
        raise _invalid("set either 'tools' / 'tool_choice' or the legacy 'functions' / 'function_call', not both",
                       "functions" if body.functions is not None else "function_call")
    choice = body.function_call
    if isinstance(choice, NamedFunction):
        choice = ToolChoiceBody(type="function", function=choice)
    elif choice is not None and choice not in LEGACY_MODES:
        raise _invalid(f"'function_call' must be 'none', 'auto' or {{\"name\": ...}}, got {choice!r}", "function_call")
    tools = [ToolBody(type="function", function=fn) for fn in body.functions or []]
    return _Asked(tools, choice, False, True)


def _choice(choice: str | ToolChoiceBody | None, fns: list[Function], legacy: bool) -> tuple[str, list[Function]]:
    """The mode (none, auto, required) and the functions a call may name."""
    param, offered = ("function_call", "functions") if legacy else ("tool_choice", "tools")
    if choice is None:
        return ("auto" if fns else "none"), fns
    if isinstance(choice, str):
        if choice not in MODES:
            raise _invalid(f"'tool_choice' must be one of none, auto, required or a named function, got {choice!r}",
                           "tool_choice")
        if choice != "none" and not fns:
            raise _invalid(f"'{param}' {choice!r} needs '{offered}'", param)
        return choice, fns
    if choice.type != "function" or choice.function is None:
        raise BusError(ErrorCode.UNSUPPORTED, "'tool_choice' must name a function: "
                       '{"type": "function", "function": {"name": ...}}', param="tool_choice")
    named = [fn for fn in fns if fn.name == choice.function.name]
    if not named:
        raise _invalid(f"'{param}' names {choice.function.name!r}, which is not in '{offered}'",
                       f"{param}.name" if legacy else "tool_choice.function.name")
    return "required", named


def _answer_schema(constraint: StructuredOutput | None) -> str | None:
    """The JSON Schema an ``auto`` answer that is not a call must match: the request's JSON response format."""
    if constraint is None:
        return None
    if constraint.kind == "json_schema":
        return constraint.json
    if constraint.kind == "json_object":
        return _ANY_OBJECT
    raise BusError(ErrorCode.UNSUPPORTED, f"a {constraint.kind!r} constraint ('structured_outputs') together with "
                   "tool calls is not supported; a JSON 'response_format' is, or set 'tool_choice' to 'none'",
                   param="structured_outputs")


def plan_tools(body: ChatCompletionBody, constraint: StructuredOutput | None = None) -> ToolPlan:
    """The tools of ``body`` (see the module docstring); ``constraint``: its ``response_format``, if any."""
    asked = _asked(body)
    fns = functions(asked.tools, asked.legacy)
    mode, callable_fns = _choice(asked.choice, fns, asked.legacy)
    if mode == "none":
        return ToolPlan(fns, None, False, asked.legacy)
    if body.logprobs:
        raise BusError(ErrorCode.UNSUPPORTED, "'logprobs' together with tool calls is not supported",
                       param="logprobs")
    required = mode == "required"  # then the answer is calls only: a response format applies to nothing
    answer_schema = None if required else _answer_schema(constraint)
    grammar = tool_format.tool_grammar(callable_fns, required=required, parallel=asked.parallel,
                                       answer_schema=answer_schema)
    if len(grammar.encode()) > MAX_GRAMMAR_BYTES:
        raise _invalid(f"the tools' schemas are larger than {MAX_GRAMMAR_BYTES} bytes together", "tools")
    return ToolPlan(fns, StructuredOutput(kind="grammar", grammar=grammar), True, asked.legacy)


def _calls(message, i: int) -> list[Call]:
    """An assistant message's calls: its ``tool_calls``, or its legacy ``function_call`` (one call, no id)."""
    at = f"messages[{i}]"
    listed = [(call, f"{at}.tool_calls[{j}]") for j, call in enumerate(message.tool_calls or [])]
    if message.function_call is not None:
        if listed:
            raise _invalid("a message carries either 'tool_calls' or the legacy 'function_call', not both",
                           f"{at}.function_call")
        listed = [(None, f"{at}.function_call")]
    calls = []
    for call, param in listed:
        if call is not None and call.type != "function":
            raise BusError(ErrorCode.UNSUPPORTED, f"only function tool calls are supported, got {call.type!r}",
                           param=f"{param}.type")
        fn = call.function if call is not None else message.function_call
        try:
            json.loads(fn.arguments or "{}")
        except ValueError:
            raise _invalid("a tool call's 'arguments' must be JSON text",
                           f"{param}.arguments" if call is None else f"{param}.function.arguments") from None
        calls.append(Call(fn.name, fn.arguments, call.id if call is not None else None))
    if calls and message.role != "assistant":
        raise _invalid("only assistant messages may carry tool calls",
                       f"{at}.tool_calls" if message.tool_calls else f"{at}.function_call")
    return calls


def _result(message, i: int) -> tuple[str, str | None]:
    """The role a message is rendered with: a legacy ``function`` message is a ``tool`` turn naming its function."""
    if message.role != "function":
        return message.role, message.name
    if not message.name:
        raise _invalid("a 'function' message needs the 'name' of the function that answered", f"messages[{i}].name")
    return "tool", message.name


def render(messages: list[ChatMessage], bodies: list, fns: list[Function]) -> list[ChatMessage]:
    """``messages`` (content already flattened) with the tools section, earlier calls and their results written in.

    A ``tool`` message is paired with its call by ``tool_call_id`` and shown with the call's
    function name; an id that matches no call of an earlier assistant message is refused.
    """
    dicts = []
    for i, (m, b) in enumerate(zip(messages, bodies)):
        role, name = _result(b, i)
        dicts.append({"role": role, "content": m.content, "name": name, "tool_calls": _calls(b, i),
                      "tool_call_id": b.tool_call_id if role == "tool" else None})
    if not fns and not any(d["tool_calls"] or d["role"] == "tool" for d in dicts):
        return messages
    try:
        rendered = tool_format.render_messages(dicts, fns)
    except tool_format.UnknownCallId as exc:
        raise _invalid(str(exc), f"messages[{exc.index}].tool_call_id") from None
    return [ChatMessage(role=d["role"], content=d["content"], name=d.get("name")) for d in rendered]
