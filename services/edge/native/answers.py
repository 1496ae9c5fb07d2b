"""Native API answers: the JSON body and the token events (SSE or WebSocket frames). Pure: bytes out.

Answers read for tool calls (a request with ``tools``) carry ``toolCalls``: the whole answer
lists each call ``{"id", "type": "function", "function": {"name", "arguments"}}``; a stream
sends, for each call, an event ``{"requestId", "toolCalls": [{"index", "id", "type",
"function": {"name", "arguments": ""}}]}`` then events ``{"requestId", "toolCalls": [{"index",
"function": {"arguments": <fragment>}}]}``, split by the same reader as OpenAI answers
(``tool_format.CallStream``), and the closing event's ``finishReason`` is ``tool_calls``.
"""

from __future__ import annotations

import msgspec

from schemas.events import Usage
from services.common.tool_format import CallStream, Piece, split_answer, walk_pieces
from services.edge.openai.bodies import ChunkFormatter
from services.edge.openai.tool_answers import answer_calls, call_arguments, call_start, called_finish_reason

_encode = msgspec.json.Encoder().encode


def usage_dict(usage: Usage) -> dict[str, int]:
    """The native usage object (camelCase)."""
    return {"promptTokens": usage.prompt_tokens, "completionTokens": usage.completion_tokens,
            "totalTokens": usage.total_tokens}


def inference_body(*, request_id: str, created: int, model: str, text: str, finish_reason: str,
                   usage: Usage) -> bytes:
    """The non-streaming answer."""
    return _encode({"requestId": request_id, "modelId": model, "created": created, "text": text,
                    "finishReason": finish_reason, "usage": usage_dict(usage)})


def inference_tool_body(*, request_id: str, created: int, model: str, text: str, finish_reason: str,
                        usage: Usage) -> bytes:
    """The non-streaming answer of a request with tools: ``text`` outside the calls, and ``toolCalls``."""
    text, calls = split_answer(text)
    body = {"requestId": request_id, "modelId": model, "created": created, "text": text,
            "finishReason": called_finish_reason(finish_reason, len(calls)), "usage": usage_dict(usage)}
    if calls:
        body["toolCalls"] = answer_calls(calls)
    return _encode(body)


class NativeChunkFormatter(ChunkFormatter):
    """SSE events ``{"requestId", "token"}`` per delta, then ``{"requestId", "finishReason", "usage", "done": true}``.

    With ``client_id`` every event also carries ``"id": client_id``; with ``framed=False`` the
    events are bare JSON (one WebSocket frame each, ``delta_frames``) instead of SSE ``data:`` events.
    """

    def __init__(self, *, request_id: str, created: int, model: str, include_usage: bool, index: int = 0,
                 client_id: str | None = None, framed: bool = True) -> None:
        super().__init__(request_id=request_id, created=created, model=model, include_usage=include_usage,
                         index=index)
        self._event_head = {"requestId": request_id}
        if client_id is not None:
            self._event_head["id"] = client_id
        self._open, self._close = (b"data: ", b"\n\n") if framed else (b"", b"")
        self._prefix = self._open + _encode(self._event_head)[:-1] + b',"token":'
        self._suffix = b"}" + self._close
        self._finish_reason = ""

    def _event(self, **fields) -> bytes:
        return self._open + _encode(dict(self._event_head, **fields)) + self._close

    def delta_frames(self, text: str) -> list[bytes]:
        """The events ``text`` completes, one per WebSocket frame."""
        return [self.delta(text)] if text else []

    def finish_frames(self, finish_reason: str) -> list[bytes]:
        """The events before the closing one (none: the finish reason waits for the closing event)."""
        self.finish(finish_reason)
        return []

    def finish(self, finish_reason: str) -> bytes:
        """Remembered for the closing event, which carries the usage too."""
        self._finish_reason = finish_reason
        return b""

    def usage(self, usage: Usage) -> bytes:
        """The closing event."""
        return self._event(finishReason=self._finish_reason, usage=usage_dict(usage), done=True)


class NativeToolChunkFormatter(NativeChunkFormatter):
    """Native events of an answer read for tool calls: tokens outside calls, ``toolCalls`` deltas (module doc)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._calls = CallStream()

    def _frames(self, pieces: list[Piece]) -> list[bytes]:
        return walk_pieces(pieces, text=super().delta,
                           start=lambda i, name: self._event(toolCalls=[call_start(i, name)]),
                           arguments=lambda i, fragment: self._event(toolCalls=[call_arguments(i, fragment)]))

    def delta_frames(self, text: str) -> list[bytes]:
        """The events ``text`` completes: a token, a call's start, or its arguments' next fragment."""
        return self._frames(self._calls.feed(text))

    def delta(self, text: str) -> bytes:
        """The SSE events ``text`` completes."""
        return b"".join(self.delta_frames(text))

    def finish_frames(self, finish_reason: str) -> list[bytes]:
        """What the reader held back; the finish reason (``tool_calls`` after a call) waits for the closing event."""
        out = self._frames(self._calls.close())
        self._finish_reason = called_finish_reason(finish_reason, self._calls.calls)
        return out

    def finish(self, finish_reason: str) -> bytes:
        """The SSE events held back until the end."""
        return b"".join(self.finish_frames(finish_reason))
