"""OpenAI response bodies and SSE chunks. Pure: bytes in, bytes out.

A token chunk is on the hot path, so each request builds its chunk prefix and suffix once
and a delta costs one JSON encode (of the text) plus a concatenation.
"""

from __future__ import annotations

import abc

import msgspec

from schemas.events import Usage

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

_encode = msgspec.json.Encoder().encode


def usage_dict(usage: Usage) -> dict[str, int]:
    """OpenAI's usage object."""
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


def sse(payload: bytes) -> bytes:
    """One SSE ``data:`` event."""
    return b"data: " + payload + b"\n\n"


def chat_completion(*, request_id: str, created: int, model: str, text: str, finish_reason: str,
                    usage: Usage) -> bytes:
    """A non-streaming ``chat.completion`` body."""
    return _encode({
        "id": request_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish_reason}],
        "usage": usage_dict(usage),
    })


def text_completion(*, request_id: str, created: int, model: str, text: str, finish_reason: str,
                    usage: Usage) -> bytes:
    """A non-streaming legacy ``text_completion`` body."""
    return _encode({
        "id": request_id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage_dict(usage),
    })


class ChunkFormatter(abc.ABC):
    """SSE chunks of one streamed request; subclasses fix the object type and choice shape."""

    object_type = ""
    # A delta choice is _TEXT_OPEN + JSON(text) + _TEXT_CLOSE.
    _TEXT_OPEN = b""
    _TEXT_CLOSE = b""

    def __init__(self, *, request_id: str, created: int, model: str, include_usage: bool) -> None:
        self._head = {"id": request_id, "object": self.object_type, "created": created, "model": model}
        self._include_usage = include_usage
        # Everything of a delta chunk before and after the text, encoded once per request.
        self._prefix = b"data: " + _encode(self._head)[:-1] + b',"choices":[' + self._TEXT_OPEN
        self._suffix = self._TEXT_CLOSE + b"]" + (b',"usage":null}' if include_usage else b"}") + b"\n\n"

    def _chunk(self, choices: list[dict], usage: Usage | None = None) -> bytes:
        body = dict(self._head, choices=choices)
        if self._include_usage:
            body["usage"] = usage_dict(usage) if usage is not None else None
        return sse(_encode(body))

    def start(self) -> bytes:
        """What opens the stream (the assistant role chunk for chat; nothing for completions)."""
        return b""

    def delta(self, text: str) -> bytes:
        """A chunk carrying new text."""
        return self._prefix + _encode(text) + self._suffix

    @abc.abstractmethod
    def finish(self, finish_reason: str) -> bytes:
        """The chunk carrying ``finish_reason``."""

    def usage(self, usage: Usage) -> bytes:
        """The final usage chunk (``choices: []``) if ``stream_options.include_usage`` was set, else nothing."""
        return self._chunk([], usage) if self._include_usage else b""


class ChatChunkFormatter(ChunkFormatter):
    """``chat.completion.chunk`` events."""

    object_type = "chat.completion.chunk"
    _TEXT_OPEN = b'{"index":0,"delta":{"content":'
    _TEXT_CLOSE = b'},"logprobs":null,"finish_reason":null}'

    def start(self) -> bytes:
        """The first chunk: the assistant role with empty content."""
        return self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])

    def finish(self, finish_reason: str) -> bytes:
        """A chunk with an empty delta and the finish reason."""
        return self._chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason}])


class CompletionChunkFormatter(ChunkFormatter):
    """Legacy ``text_completion`` stream events."""

    object_type = "text_completion"
    _TEXT_OPEN = b'{"text":'
    _TEXT_CLOSE = b',"index":0,"logprobs":null,"finish_reason":null}'

    def finish(self, finish_reason: str) -> bytes:
        """A chunk with empty text and the finish reason."""
        return self._chunk([{"text": "", "index": 0, "logprobs": None, "finish_reason": finish_reason}])
