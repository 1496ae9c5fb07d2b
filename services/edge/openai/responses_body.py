"""Response objects, output items and stream events of the Responses API, in OpenAI's shapes. Pure.

``ResponseDraft`` gathers one answer (its text, how it ended, its usage) and renders the
``response`` object at any stage (``in_progress``, ``completed``, ``incomplete``, ``failed``) and
the items it holds; ``item_json`` renders a stored item as ``input_items`` lists it. Stream
events are ``event: <type>`` + ``data: <json>`` SSE events, each with its ``sequence_number``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec

from schemas.errors import BusError
from schemas.events import StreamError, Usage
from schemas.responses import ResponseItem

_encode = msgspec.json.Encoder().encode

# finish_reason -> (status, incomplete_details.reason); any other finish completes the response.
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def usage_json(usage: Usage | None) -> dict[str, Any] | None:
    """OpenAI's Responses ``usage`` (input/output tokens and their details)."""
    if usage is None:
        return None
    return {"input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": usage.cached_tokens},
            "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.total_tokens}


def output_text(text: str) -> dict[str, Any]:
    """An ``output_text`` content part."""
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def item_json(item: ResponseItem, status: str = "completed") -> dict[str, Any]:
    """One item as the API shows it: an assistant message's parts are ``output_text``, others' ``input_text``."""
    if item.type == "message":
        if item.role == "assistant":
            content = [output_text(text) for text in item.texts]
        else:
            content = [{"type": "input_text", "text": text} for text in item.texts]
        return {"id": item.id, "type": "message", "role": item.role, "status": status, "content": content}
    if item.type == "function_call":
        return {"id": item.id, "type": "function_call", "status": status, "call_id": item.call_id,
                "name": item.name, "arguments": item.arguments}
    return {"id": item.id, "type": item.type, "status": status, "call_id": item.call_id, "output": item.output}


def sse_event(payload: dict[str, Any]) -> bytes:
    """One typed SSE event: ``event: <type>`` and the payload (which carries its ``type``) as ``data``."""
    return b"event: " + payload["type"].encode() + b"\ndata: " + _encode(payload) + b"\n\n"


class ResponseDraft:
    """One response while it is generated: its id, echoed request fields, text, finish and usage."""

    def __init__(self, *, response_id: str, created: int, model: str, shown: dict[str, Any]) -> None:
        self.id = response_id
        self.created = created
        self.model = model
        self.shown = shown
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.parts: list[str] = []
        self.finish_reason = ""
        self.usage: Usage | None = None
        self.error: BusError | StreamError | None = None

    @property
    def text(self) -> str:
        """The answer's text so far."""
        return "".join(self.parts)

    @property
    def status(self) -> str:
        """``in_progress`` until it ended; then ``completed``, ``incomplete`` (cut short) or ``failed``."""
        if self.error is not None:
            return "failed"
        if not self.finish_reason:
            return "in_progress"
        return "incomplete" if self.finish_reason in _INCOMPLETE else "completed"

    def output_items(self) -> list[ResponseItem]:
        """The answer as output items: one assistant message (tool calls become items of their own)."""
        return [ResponseItem(id=self.message_id, type="message", role="assistant", texts=[self.text])]

    def message_json(self, *, final: bool) -> dict[str, Any]:
        """The output message item: empty while in progress (as ``output_item.added`` shows it), else whole."""
        if not final:
            return {"id": self.message_id, "type": "message", "role": "assistant", "status": "in_progress",
                    "content": []}
        status = "incomplete" if self.status == "incomplete" else "completed"
        return item_json(self.output_items()[0], status)

    def response_json(self) -> dict[str, Any]:
        """The ``response`` object as it stands (``output`` holds the message once the answer ended)."""
        status = self.status
        ended = status in ("completed", "incomplete")
        error = None
        if self.error is not None:
            error = {"code": self.error.code, "message": self.error.message}
        incomplete = {"reason": _INCOMPLETE[self.finish_reason]} if status == "incomplete" else None
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "completed_at": int(time.time()) if ended else None, "error": error,
            "incomplete_details": incomplete, "model": self.model,
            "output": [self.message_json(final=True)] if ended else [],
            "usage": usage_json(self.usage) if ended else None, **self.shown,
        }
