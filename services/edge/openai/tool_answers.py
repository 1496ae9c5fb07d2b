"""Tool calls in OpenAI chat answers: read from the generated text, shown as ``tool_calls``. Pure.

The engine streams text; ``services.common.tool_format.CallStream`` splits it into text and
``<tool_call>`` blocks. Whole answers (``tool_message``) and streams (``ToolChunkFormatter``)
use the same splitter, so a streamed answer assembles into exactly the whole one. Each call
gets an id ``call_<24 hex>``; an answer that made a call and ended on its own finishes with
``tool_calls`` (cut by ``max_tokens`` it stays ``length``, the last call's arguments incomplete).
A stream sends a call as OpenAI does: a delta with its ``index``, ``id``, ``type`` and
``function.name`` (arguments ``""``), then ``function.arguments`` fragments.
"""

from __future__ import annotations

import uuid

from services.common.tool_format import CallArguments, CallStart, CallStream, Piece, Text, split_answer
from services.edge.openai.bodies import ChatChunkFormatter, ChoiceResult


def call_id() -> str:
    """A fresh tool call id."""
    return "call_" + uuid.uuid4().hex[:24]


def _finish_reason(reason: str, calls: int) -> str:
    return "tool_calls" if calls and reason == "stop" else reason


def tool_message(choice: ChoiceResult) -> tuple[dict, str]:
    """A chat choice's ``message`` (``content`` None when there is only whitespace beside calls) and finish reason."""
    text, calls = split_answer(choice.text)
    if not calls:
        return {"role": "assistant", "content": text}, choice.finish_reason
    message = {"role": "assistant", "content": text if text.strip() else None,
               "tool_calls": [{"id": call_id(), "type": "function",
                               "function": {"name": c.name, "arguments": c.arguments}} for c in calls]}
    return message, _finish_reason(choice.finish_reason, len(calls))


class ToolChunkFormatter(ChatChunkFormatter):
    """``chat.completion.chunk`` events of an answer read for tool calls (see the module docstring)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._calls = CallStream()

    def _tool_delta(self, call: dict) -> bytes:
        return self._chunk([{"index": self.index, "delta": {"tool_calls": [call]}, "logprobs": None,
                             "finish_reason": None}])

    def _pieces(self, pieces: list[Piece]) -> bytes:
        out = []
        for piece in pieces:
            match piece:
                case Text(text=text) if text:
                    out.append(super().delta(text))
                case CallStart(index=i, name=name):
                    out.append(self._tool_delta({"index": i, "id": call_id(), "type": "function",
                                                 "function": {"name": name, "arguments": ""}}))
                case CallArguments(index=i, fragment=fragment):
                    out.append(self._tool_delta({"index": i, "function": {"arguments": fragment}}))
        return b"".join(out)

    def delta(self, text: str) -> bytes:
        """The chunks ``text`` completes: content, a call's start, or its arguments' next fragment."""
        return self._pieces(self._calls.feed(text))

    def finish(self, finish_reason: str) -> bytes:
        """What the splitter held back, then the finish chunk (``tool_calls`` after a call)."""
        rest = self._pieces(self._calls.close())
        return rest + super().finish(_finish_reason(finish_reason, self._calls.calls))
