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
from services.common.tool_format import split_answer

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

    def __init__(self, *, response_id: str, created: int, model: str, shown: dict[str, Any],
                 read_calls: bool = False) -> None:
        self.id = response_id
        self.created = created
        self.model = model
        self.shown = shown
        self.read_calls = read_calls  # tools offered: the answer is read for function calls
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.parts: list[str] = []
        self.finish_reason = ""
        self.usage: Usage | None = None
        self.error: BusError | StreamError | None = None
        self._call_ids: list[tuple[str, str]] = []  # (item id, call id) of each call, in order

    @property
    def raw(self) -> str:
        """Everything generated so far (call blocks included)."""
        return "".join(self.parts)

    @property
    def text(self) -> str:
        """The answer's text so far, outside any function call."""
        return split_answer(self.raw)[0] if self.read_calls else self.raw

    def call_ids(self, index: int) -> tuple[str, str]:
        """The item id and ``call_id`` of call ``index`` (made once: a stream and the stored object agree)."""
        while len(self._call_ids) <= index:
            self._call_ids.append((f"fc_{uuid.uuid4().hex}", "call_" + uuid.uuid4().hex[:24]))
        return self._call_ids[index]

    @property
    def status(self) -> str:
        """``in_progress`` until it ended; then ``completed``, ``incomplete`` (cut short) or ``failed``."""
        if self.error is not None:
            return "failed"
        if not self.finish_reason:
            return "in_progress"
        return "incomplete" if self.finish_reason in _INCOMPLETE else "completed"

    def message_item(self) -> ResponseItem:
        """The assistant message of the answer (its text outside calls)."""
        return ResponseItem(id=self.message_id, type="message", role="assistant", texts=[self.text])

    def output_items(self) -> list[ResponseItem]:
        """The answer as output items: the assistant message (left out when only calls were made), then
        one ``function_call`` item per call."""
        if not self.read_calls:
            return [self.message_item()]
        text, calls = split_answer(self.raw)
        items = [self.message_item()] if text.strip() or not calls else []
        for i, call in enumerate(calls):
            item_id, call_id = self.call_ids(i)
            items.append(ResponseItem(id=item_id, type="function_call", call_id=call_id, name=call.name,
                                      arguments=call.arguments))
        return items

    def message_json(self, *, final: bool) -> dict[str, Any]:
        """The output message item: empty while in progress (as ``output_item.added`` shows it), else whole."""
        if not final:
            return {"id": self.message_id, "type": "message", "role": "assistant", "status": "in_progress",
                    "content": []}
        return item_json(self.message_item(), self.item_status)

    @property
    def item_status(self) -> str:
        """An ended output item's status."""
        return "incomplete" if self.status == "incomplete" else "completed"

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
            "output": [item_json(i, self.item_status) for i in self.output_items()] if ended else [],
            "usage": usage_json(self.usage) if ended else None, **self.shown,
        }
