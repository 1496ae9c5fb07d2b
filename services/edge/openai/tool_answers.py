"""Tool calls in OpenAI chat answers: read from the generated text, shown as ``tool_calls``. Pure.

The engine streams text; ``services.common.tool_format.CallStream`` splits it into text and
``<tool_call>`` blocks. Whole answers (``tool_message``) and streams (``ToolChunkFormatter``)
use the same splitter, so a streamed answer assembles into exactly the whole one. Each call
gets an id ``call_<24 hex>``; an answer that made a call and ended on its own finishes with
``tool_calls`` (cut by ``max_tokens`` it stays ``length``, the last call's arguments incomplete).
A stream sends a call as OpenAI does: a delta with its ``index``, ``id``, ``type`` and
``function.name`` (arguments ``""``), then ``function.arguments`` fragments.

A request in the legacy ``functions`` form gets the legacy shape: ``message.function_call``
``{name, arguments}`` (one call: legacy calls are never parallel), finish reason
``function_call``, streamed as ``delta.function_call`` (the name first, then argument fragments).

The native API shows calls in the same objects (``answer_calls``, ``call_start``,
``call_arguments``) under its own keys, and finishes with the same rule (``called_finish_reason``).
"""

from __future__ import annotations

import uuid

from services.common.tool_format import Call, CallStream, Piece, split_answer, walk_pieces
from services.edge.openai.bodies import ChatChunkFormatter, ChoiceResult


def call_id() -> str:
    """A fresh tool call id."""
    return "call_" + uuid.uuid4().hex[:24]


def called_finish_reason(reason: str, calls: int, called: str = "tool_calls") -> str:
    """``called`` for an answer that made calls and ended on its own; otherwise ``reason`` (``length`` stays)."""
    return called if calls and reason == "stop" else reason


def answer_calls(calls: list[Call]) -> list[dict]:
    """A whole answer's calls: ``{"id", "type": "function", "function": {"name", "arguments"}}`` each."""
    return [{"id": call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls]


def call_start(index: int, name: str) -> dict:
    """A streamed call's first delta: its index, a fresh id, its name, arguments ``""``."""
    return {"index": index, "id": call_id(), "type": "function", "function": {"name": name, "arguments": ""}}


def call_arguments(index: int, fragment: str) -> dict:
    """A streamed call's next delta: a fragment of its arguments."""
    return {"index": index, "function": {"arguments": fragment}}


def tool_message(choice: ChoiceResult) -> tuple[dict, str]:
    """A chat choice's ``message`` (``content`` None when there is only whitespace beside calls) and finish reason."""
    text, calls = split_answer(choice.text)
    if not calls:
        return {"role": "assistant", "content": text}, choice.finish_reason
    message = {"role": "assistant", "content": text if text.strip() else None, "tool_calls": answer_calls(calls)}
    return message, called_finish_reason(choice.finish_reason, len(calls))


def function_message(choice: ChoiceResult) -> tuple[dict, str]:
    """A legacy chat choice's ``message`` (its call as ``function_call``) and finish reason (``function_call``)."""
    text, calls = split_answer(choice.text)
    if not calls:
        return {"role": "assistant", "content": text}, choice.finish_reason
    call = calls[0]  # the grammar allows one call when the request used ``functions``
    message = {"role": "assistant", "content": text if text.strip() else None,
               "function_call": {"name": call.name, "arguments": call.arguments}}
    return message, called_finish_reason(choice.finish_reason, len(calls), "function_call")


class ToolChunkFormatter(ChatChunkFormatter):
    """``chat.completion.chunk`` events of an answer read for tool calls (see the module docstring)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._calls = CallStream()

    called = "tool_calls"  # the finish reason of an answer that made a call

    def _tool_delta(self, call: dict) -> bytes:
        return self._chunk([{"index": self.index, "delta": {"tool_calls": [call]}, "logprobs": None,
                             "finish_reason": None}])

    def _start(self, index: int, name: str) -> bytes:
        return self._tool_delta(call_start(index, name))

    def _arguments(self, index: int, fragment: str) -> bytes:
        return self._tool_delta(call_arguments(index, fragment))

    def _pieces(self, pieces: list[Piece]) -> bytes:
        return b"".join(walk_pieces(pieces, text=super().delta, start=self._start, arguments=self._arguments))

    def delta(self, text: str) -> bytes:
        """The chunks ``text`` completes: content, a call's start, or its arguments' next fragment."""
        return self._pieces(self._calls.feed(text))

    def finish(self, finish_reason: str) -> bytes:
        """What the splitter held back, then the finish chunk (``tool_calls`` after a call)."""
        rest = self._pieces(self._calls.close())
        return rest + super().finish(called_finish_reason(finish_reason, self._calls.calls, self.called))


class FunctionChunkFormatter(ToolChunkFormatter):
    """Chunks of a legacy ``functions`` answer: ``delta.function_call`` (name first, then argument fragments)."""

    called = "function_call"

    def _function_delta(self, function_call: dict) -> bytes:
        return self._chunk([{"index": self.index, "delta": {"function_call": function_call}, "logprobs": None,
                             "finish_reason": None}])

    def _start(self, index: int, name: str) -> bytes:
        return self._function_delta({"name": name, "arguments": ""})

    def _arguments(self, index: int, fragment: str) -> bytes:
        return self._function_delta({"arguments": fragment})
