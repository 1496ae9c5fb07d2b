"""OpenAI response bodies and SSE chunks. Pure: bytes in, bytes out.

A token chunk is on the hot path, so each request builds its chunk prefix and suffix once
and a delta costs one JSON encode (of the text) plus a concatenation. A delta carrying
log-probabilities (only when the request asked for them) is built whole instead. A request
with ``n`` choices streams through one formatter per choice (``index``).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from schemas.events import TokenLogprob, Usage

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

_encode = msgspec.json.Encoder().encode


def usage_dict(usage: Usage) -> dict:
    """OpenAI's usage object (``prompt_tokens_details.cached_tokens`` when the engine reused a prefix)."""
    body = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}
    if usage.cached_tokens:
        body["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    return body


def sse(payload: bytes) -> bytes:
    """One SSE ``data:`` event."""
    return b"data: " + payload + b"\n\n"


@dataclass(frozen=True, slots=True)
class ChoiceResult:
    """One finished choice of a non-streaming answer; ``logprobs`` is None unless the request asked for them."""

    text: str
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    """OpenAI's chat ``logprobs`` object: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    return {"content": [
        {"token": e.token, "logprob": e.logprob, "bytes": _bytes(e.token),
         "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": _bytes(t.token)} for t in e.top]}
        for e in entries]}


def completion_logprobs(entries: list[TokenLogprob], offset: int = 0) -> dict:
    """The legacy completions ``logprobs`` object; ``text_offset`` counts from ``offset`` in the completion text.

    ``top_logprobs`` maps token text to log-probability for the alternatives asked for plus the
    sampled token (so up to ``logprobs + 1`` entries, as OpenAI documents).
    """
    tokens, offsets = [], []
    for e in entries:
        tokens.append(e.token)
        offsets.append(offset)
        offset += len(e.token)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{**{t.token: t.logprob for t in e.top}, e.token: e.logprob} for e in entries],
            "text_offset": offsets}


def _choices(text: str, finish_reason: str, logprobs: list[TokenLogprob] | None,
             choices: list[ChoiceResult] | None) -> list[ChoiceResult]:
    return choices if choices is not None else [ChoiceResult(text, finish_reason, logprobs)]


def text_message(choice: ChoiceResult) -> tuple[dict, str]:
    """A chat choice's ``message`` and ``finish_reason``: the text as the assistant's content."""
    return {"role": "assistant", "content": choice.text}, choice.finish_reason


def chat_completion(*, request_id: str, created: int, model: str, usage: Usage, text: str = "",
                    finish_reason: str = "", logprobs: list[TokenLogprob] | None = None,
                    choices: list[ChoiceResult] | None = None,
                    message: Callable[[ChoiceResult], tuple[dict, str]] = text_message) -> bytes:
    """A non-streaming ``chat.completion`` body: one choice (``text``...), or one per entry of ``choices``.

    ``message`` builds each choice's message and finish reason (tool calls read from the text: ``tool_answers``).
    """
    choices = _choices(text, finish_reason, logprobs, choices)
    shown = [message(c) for c in choices]
    return _encode({
        "id": request_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": i, "message": shown[i][0],
                     "logprobs": chat_logprobs(c.logprobs) if c.logprobs is not None else None,
                     "finish_reason": shown[i][1]} for i, c in enumerate(choices)],
        "usage": usage_dict(usage),
    })


def text_completion(*, request_id: str, created: int, model: str, usage: Usage, text: str = "",
                    finish_reason: str = "", logprobs: list[TokenLogprob] | None = None,
                    choices: list[ChoiceResult] | None = None) -> bytes:
    """A non-streaming legacy ``text_completion`` body: one choice (``text``...), or one per entry of ``choices``."""
    choices = _choices(text, finish_reason, logprobs, choices)
    return _encode({
        "id": request_id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"text": c.text, "index": i,
                     "logprobs": completion_logprobs(c.logprobs) if c.logprobs is not None else None,
                     "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
        "usage": usage_dict(usage),
    })


class ChunkFormatter(abc.ABC):
    """SSE chunks of one choice (``index``) of a streamed request; subclasses fix the object type and choice shape."""

    object_type = ""
    # A delta choice is _TEXT_OPEN + JSON(text) + _TEXT_CLOSE (``%d``: the choice index).
    _TEXT_OPEN = b""
    _TEXT_CLOSE = b""

    def __init__(self, *, request_id: str, created: int, model: str, include_usage: bool, index: int = 0) -> None:
        self._head = {"id": request_id, "object": self.object_type, "created": created, "model": model}
        self._include_usage = include_usage
        self.index = index
        # Everything of a delta chunk before and after the text, encoded once per request.
        text_open = self._TEXT_OPEN % index if b"%d" in self._TEXT_OPEN else self._TEXT_OPEN
        text_close = self._TEXT_CLOSE % index if b"%d" in self._TEXT_CLOSE else self._TEXT_CLOSE
        self._prefix = b"data: " + _encode(self._head)[:-1] + b',"choices":[' + text_open
        self._suffix = text_close + b"]" + (b',"usage":null}' if include_usage else b"}") + b"\n\n"

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

    def delta_logprobs(self, text: str, entries: list[TokenLogprob]) -> bytes:
        """A chunk carrying new text and the log-probabilities of the tokens behind it (an API without them: text)."""
        return self.delta(text)

    @abc.abstractmethod
    def finish(self, finish_reason: str) -> bytes:
        """The chunk carrying ``finish_reason``."""

    def usage(self, usage: Usage) -> bytes:
        """The final usage chunk (``choices: []``) if ``stream_options.include_usage`` was set, else nothing."""
        return self._chunk([], usage) if self._include_usage else b""


class ChatChunkFormatter(ChunkFormatter):
    """``chat.completion.chunk`` events."""

    object_type = "chat.completion.chunk"
    _TEXT_OPEN = b'{"index":%d,"delta":{"content":'
    _TEXT_CLOSE = b'},"logprobs":null,"finish_reason":null}'

    def start(self) -> bytes:
        """The first chunk: the assistant role with empty content."""
        return self._chunk([{"index": self.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])

    def delta_logprobs(self, text: str, entries: list[TokenLogprob]) -> bytes:
        """A content delta with its ``logprobs.content`` entries."""
        return self._chunk([{"index": self.index, "delta": {"content": text}, "logprobs": chat_logprobs(entries),
                             "finish_reason": None}])

    def finish(self, finish_reason: str) -> bytes:
        """A chunk with an empty delta and the finish reason."""
        return self._chunk([{"index": self.index, "delta": {}, "logprobs": None, "finish_reason": finish_reason}])


class CompletionChunkFormatter(ChunkFormatter):
    """Legacy ``text_completion`` stream events."""

    object_type = "text_completion"
    _TEXT_OPEN = b'{"text":'
    _TEXT_CLOSE = b',"index":%d,"logprobs":null,"finish_reason":null}'

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._offset = 0  # ``text_offset`` of the next token, in this choice's text

    def delta_logprobs(self, text: str, entries: list[TokenLogprob]) -> bytes:
        """A text delta with its ``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset``."""
        logprobs = completion_logprobs(entries, self._offset)
        self._offset += sum(len(e.token) for e in entries)
        return self._chunk([{"text": text, "index": self.index, "logprobs": logprobs, "finish_reason": None}])

    def finish(self, finish_reason: str) -> bytes:
        """A chunk with empty text and the finish reason."""
        return self._chunk([{"text": "", "index": self.index, "logprobs": None, "finish_reason": finish_reason}])
