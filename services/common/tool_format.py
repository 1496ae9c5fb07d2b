"""The one tool-calling format: how tools and calls are written into a chat, and read back. Pure.

The default model's chat template (SmolLM2, ChatML) has no tool section, so the platform uses
one format for every model, rendered into ordinary chat messages before any chat template
runs (the edge does it for inference, the trainer for training data, both through this module):

- the functions are listed in a system-message section (``tools_section``), one JSON object per
  line (``{"name", "description", "parameters"}``), appended to the first system message or
  put in a new one in front;
- an assistant call is written ``<tool_call>{"name":"<name>","arguments":{...}}</tool_call>``
  (compact JSON, one block per call, after any text of that turn);
- a tool's result is its own ``tool`` turn; a result paired with its call (by ``tool_call_id``)
  is written ``<tool_response name="<name>">...</tool_response>`` so the model sees which
  function answered, an unpaired one is the result as given.

``tool_grammar`` builds the llguidance Lark grammar that makes a model write such blocks (every
call's arguments valid against its function's schema); ``CallStream`` reads them back from
generated text as it arrives, so a streamed answer and a whole one are split the same way;
``walk_pieces`` hands its pieces to a streamed answer's writer (OpenAI chunks, native events,
Responses events), so every answer shape walks them the same way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
RESPONSE_OPEN = '<tool_response name="{name}">'
RESPONSE_CLOSE = "</tool_response>"
MAX_PARALLEL_CALLS = 8  # calls one constrained answer may hold when parallel calls are allowed
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
# Compact JSON inside the call (no free whitespace): a sampled model cannot wander into endless blanks.
_COMPACT = {"whitespace_flexible": False}
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_.-]{1,64})"\s*,\s*"arguments"\s*:\s*')
_SECTION = ("# Tools\n\nYou may call one or more functions to help with the request. The functions, one JSON "
            "object per line:\n{lines}\n\nTo call a function, write "
            '<tool_call>{{"name": <function name>, "arguments": <the arguments as a JSON object>}}</tool_call>. '
            "Each result comes back in a tool turn.")


@dataclass(frozen=True, slots=True)
class Function:
    """One function a model may call: its name, what it does, and its arguments' JSON Schema."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: dict(NO_PARAMETERS))


@dataclass(frozen=True, slots=True)
class Call:
    """One tool call as the model wrote it: the function's name and its arguments as JSON text."""

    name: str
    arguments: str
    id: str | None = None  # the client's id for the call (``tool_call_id`` of its result)


class UnknownCallId(ValueError):
    """A ``tool`` turn's ``tool_call_id`` names no call of an earlier assistant turn."""

    def __init__(self, index: int, call_id: str) -> None:
        super().__init__(f"'tool_call_id' {call_id!r} does not match any tool call of an earlier assistant message")
        self.index = index
        self.call_id = call_id


def tools_section(functions: list[Function]) -> str:
    """The system-prompt section listing ``functions``."""
    lines = "\n".join(json.dumps({"name": f.name, "description": f.description, "parameters": f.parameters},
                                 ensure_ascii=False) for f in functions)
    return _SECTION.format(lines=lines)


def call_block(call: Call) -> str:
    """``<tool_call>{"name":...,"arguments":...}</tool_call>``; arguments that are not JSON are kept as a string."""
    try:
        arguments = json.dumps(json.loads(call.arguments or "{}"), separators=(",", ":"), ensure_ascii=False)
    except ValueError:
        arguments = json.dumps(call.arguments, ensure_ascii=False)
    return f'{CALL_OPEN}{{"name":{json.dumps(call.name)},"arguments":{arguments}}}{CALL_CLOSE}'


def result_block(name: str, content: str) -> str:
    """A tool's result paired with its call: ``<tool_response name="<name>">content</tool_response>``."""
    return RESPONSE_OPEN.format(name=name) + content + RESPONSE_CLOSE


def render_messages(messages: list[dict], functions: list[Function]) -> list[dict]:
    """Chat messages with tools, calls and results written in the platform's format.

    Each input message is ``{"role", "content", "name"?, "tool_calls"?: [Call], "tool_call_id"?}``;
    each output one ``{"role", "content", "name"?}`` any chat template renders. A ``tool`` turn
    is paired with its call by ``tool_call_id`` (or names its function itself in ``name``) and is
    then written with that function's name; an id that matches no earlier call raises
    ``UnknownCallId``. Without functions and calls the messages come back as they were.
    """
    out = []
    called: dict[str, str] = {}  # call id -> function name, of the calls so far
    for i, m in enumerate(messages):
        content = m.get("content") or ""
        calls = m.get("tool_calls") or []
        if calls:
            content = content + "".join(call_block(c) for c in calls)
            called.update((c.id, c.name) for c in calls if c.id)
        name = m.get("name")
        if m["role"] == "tool":
            call_id = m.get("tool_call_id")
            if call_id is not None and call_id not in called:
                raise UnknownCallId(i, call_id)
            name = called[call_id] if call_id is not None else name
            if name is not None:
                content = result_block(name, content)
        rendered = {"role": m["role"], "content": content}
        if name is not None:
            rendered["name"] = name
        out.append(rendered)
    if functions:
        section = tools_section(functions)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": (out[0]["content"] + "\n\n" + section) if out[0]["content"] else section}
        else:
            out.insert(0, {"role": "system", "content": section})
    return out


def _lark_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _function_rule(index: int, function: Function) -> str:
    schema = {**function.parameters, "x-guidance": _COMPACT}
    head = _lark_literal(f'{{"name":{json.dumps(function.name)},"arguments":')
    return f"fn_{index}: {head} %json {json.dumps(schema, ensure_ascii=False)} \"}}\"\n"


def tool_grammar(functions: list[Function], *, required: bool, parallel: bool, answer_schema: str | None = None) -> str:
    """The llguidance Lark grammar of an answer under ``tool_choice``.

    ``required`` (``required`` or one named function, then ``functions`` holds just that one):
    the answer is one call, or with ``parallel`` 1..``MAX_PARALLEL_CALLS`` calls, one block after
    the other. Otherwise (``auto``) free text, or text up to a ``<tool_call>`` tag followed by
    the call(s): the tag is a lazy trigger, so the text is free until the model writes it.
    ``answer_schema`` (a JSON Schema as text, only with ``auto``: the request's response format)
    replaces the free text: the answer is either compact JSON valid against it, or the call(s).
    """
    fns = " | ".join(f"fn_{i}" for i in range(len(functions)))
    more = f" call{{0,{MAX_PARALLEL_CALLS - 1}}}" if parallel else ""
    lines = ["%llguidance {}"]
    if required:
        lines.append(f"start: call{more}")
    elif answer_schema is not None:
        schema = {**json.loads(answer_schema), "x-guidance": _COMPACT}
        lines += [f"start: answer | call{more}", f"answer: %json {json.dumps(schema, ensure_ascii=False)}"]
    else:
        lines += [f'start: TEXT | head ({fns}) {_lark_literal(CALL_CLOSE)}{more}',
                  f"head[lazy]: TEXT {_lark_literal(CALL_OPEN)}", r"TEXT: /(.|\n)*/"]
    lines.append(f"call: {_lark_literal(CALL_OPEN)} ({fns}) {_lark_literal(CALL_CLOSE)}")
    return "\n".join(lines) + "\n" + "".join(_function_rule(i, f) for i, f in enumerate(functions))


@dataclass(frozen=True, slots=True)
class Text:
    """Answer text outside any call."""

    text: str


@dataclass(frozen=True, slots=True)
class CallStart:
    """Call ``index`` begins: its function's name is known."""

    index: int
    name: str


@dataclass(frozen=True, slots=True)
class CallArguments:
    """The next fragment of call ``index``'s arguments (JSON text; the fragments concatenate to it)."""

    index: int
    fragment: str


Piece = Text | CallStart | CallArguments
T = TypeVar("T")


def walk_pieces(pieces: Iterable[Piece], *, text: Callable[[str], T], start: Callable[[int, str], T],
                arguments: Callable[[int, str], T]) -> list[T]:
    """What each piece becomes in an answer, in order: ``text(text)``, ``start(index, name)`` or
    ``arguments(index, fragment)``. The one walk of ``CallStream``'s pieces behind every streamed
    answer shape, which then differ only in what a call's start and fragments look like.
    """
    out: list[T] = []
    for piece in pieces:
        match piece:
            case Text(text=t) if t:
                out.append(text(t))
            case CallStart(index=i, name=name):
                out.append(start(i, name))
            case CallArguments(index=i, fragment=fragment) if fragment:
                out.append(arguments(i, fragment))
    return out


def _held_prefix(text: str, tag: str) -> int:
    """Where the longest suffix of ``text`` that could begin ``tag`` starts (``len(text)`` if none)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return len(text) - k
    return len(text)


class CallStream:
    """Splits generated text into ``Text`` and calls as it arrives: ``feed`` each delta, then ``close``.

    A call's name is reported as soon as its head (``{"name":"...","arguments":``) is complete,
    its arguments in fragments as they arrive; text that only may begin a tag is held back
    until it is known. A ``<tool_call>`` block that never gets a well-formed head is text.
    """

    def __init__(self) -> None:
        self._buf = ""
        self._in_call = False
        self._name: str | None = None
        self._sent = 0  # of the current call's arguments, in ``_buf``
        self.calls = 0

    def feed(self, text: str) -> list[Piece]:
        """The pieces ``text`` completes."""
        self._buf += text
        out: list[Piece] = []
        while self._step(out):
            pass
        return out

    def _step(self, out: list[Piece]) -> bool:
        """Take one piece off the buffer; False when the rest must wait for more text."""
        if not self._in_call:
            at = self._buf.find(CALL_OPEN)
            cut = at if at >= 0 else _held_prefix(self._buf, CALL_OPEN)
            if cut:
                out.append(Text(self._buf[:cut]))
            self._buf = self._buf[cut + len(CALL_OPEN):] if at >= 0 else self._buf[cut:]
            self._in_call, self._name, self._sent = at >= 0, None, 0
            return at >= 0
        if self._name is None:
            head = _HEAD.match(self._buf)
            if head is None:
                if CALL_CLOSE in self._buf:  # a malformed block: it stays text
                    end = self._buf.index(CALL_CLOSE) + len(CALL_CLOSE)
                    out.append(Text(CALL_OPEN + self._buf[:end]))
                    self._buf, self._in_call = self._buf[end:], False
                    return True
                return False
            self._name = head.group(1)
            self._buf = self._buf[head.end():]
            out.append(CallStart(self.calls, self._name))
            return True
        end = self._buf.find(CALL_CLOSE)
        if end >= 0:
            inner = self._buf[:end].rstrip()
            arguments = inner[:-1].rstrip() if inner.endswith("}") else inner
            self._emit(out, max(len(arguments), self._sent))
            self._buf, self._in_call = self._buf[end + len(CALL_CLOSE):], False
            self.calls += 1
            return True
        self._emit(out, self._safe_end())
        return False

    def _safe_end(self) -> int:
        """How much of the current call's buffer is surely arguments (not the closing brace and tag)."""
        brace = self._buf.rfind("}")
        if brace >= 0:
            after = self._buf[brace + 1:].lstrip()
            if CALL_CLOSE.startswith(after):
                return len(self._buf[:brace].rstrip())
        return len(self._buf.rstrip())

    def _emit(self, out: list[Piece], upto: int) -> None:
        if upto > self._sent:
            out.append(CallArguments(self.calls, self._buf[self._sent:upto]))
            self._sent = upto

    def close(self) -> list[Piece]:
        """What is left at the end of the answer: held text, or the rest of a call cut short."""
        out: list[Piece] = []
        if not self._in_call:
            if self._buf:
                out.append(Text(self._buf))
        elif self._name is None:
            out.append(Text(CALL_OPEN + self._buf))
        else:
            self._emit(out, len(self._buf))
            self.calls += 1
        self._buf, self._in_call = "", False
        return out


def split_answer(text: str) -> tuple[str, list[Call]]:
    """A whole answer as its text (outside calls) and its calls, exactly as ``CallStream`` splits it."""
    stream = CallStream()
    pieces = stream.feed(text) + stream.close()
    texts: list[str] = []
    names: list[str] = []
    arguments: list[list[str]] = []
    for piece in pieces:
        match piece:
            case Text(text=t):
                texts.append(t)
            case CallStart(name=name):
                names.append(name)
                arguments.append([])
            case CallArguments(index=i, fragment=fragment):
                arguments[i].append(fragment)
    return "".join(texts), [Call(n, "".join(a)) for n, a in zip(names, arguments)]
