"""The native API of the seed documents: ``/api/v1/inference``, ``/inference/stream``, ``/models``, ``/health``.

Same schema messages underneath as the OpenAI endpoints: a native body is validated into the
same ``ParsedRequest`` and served by the same code; only the field names and the response
shapes differ (camelCase, as the seed's Gateway spoke).
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from schemas.errors import BusError, ErrorCode
from schemas.events import Usage
from services.edge.openai import completions
from services.edge.system import health
from services.edge.config import EdgeConfig
from services.edge.native.types import NativeInferenceBody
from services.edge.openai.bodies import ChunkFormatter
from services.edge.openai.structured import from_response_format
from services.edge.openai.translate import ParsedRequest, _decode, _messages, _sampling
from services.edge.state import EDGE

_decoder = msgspec.json.Decoder(NativeInferenceBody)
_encode = msgspec.json.Encoder().encode


def parse_native(raw: bytes, *, default_max_tokens: int, stream: bool) -> ParsedRequest:
    """Validate a native inference body into the request every endpoint shares."""
    body = _decode(_decoder, raw)
    model = body.modelId or body.model_id or body.model
    if not model:
        raise BusError(ErrorCode.INVALID_REQUEST, "'modelId' is required", param="modelId")
    if (body.prompt is None) == (body.messages is None):
        raise BusError(ErrorCode.INVALID_REQUEST, "exactly one of 'prompt' and 'messages' is required",
                       param="prompt")
    if body.timeout is not None and body.timeout <= 0:
        raise BusError(ErrorCode.INVALID_REQUEST, f"'timeout' must be > 0 seconds, got {body.timeout!r}",
                       param="timeout")
    gen = body.generation
    return ParsedRequest(
        model=model, messages=_messages(body.messages) if body.messages is not None else None, prompt=body.prompt,
        sampling=_sampling(gen, gen.max_new_tokens, default_max_tokens, "generation.max_new_tokens"),
        stream=stream, include_usage=True, priority=body.priority, adapter=body.adapter or None, user=body.user,
        timeout=body.timeout, cache=body.cache, structured=from_response_format(body.responseFormat, "responseFormat"))


def _usage(usage: Usage) -> dict[str, int]:
    return {"promptTokens": usage.prompt_tokens, "completionTokens": usage.completion_tokens,
            "totalTokens": usage.total_tokens}


def inference_body(*, request_id: str, created: int, model: str, text: str, finish_reason: str,
                   usage: Usage) -> bytes:
    """The non-streaming answer."""
    return _encode({"requestId": request_id, "modelId": model, "created": created, "text": text,
                    "finishReason": finish_reason, "usage": _usage(usage)})


class NativeChunkFormatter(ChunkFormatter):
    """SSE events ``{"requestId", "token"}`` per delta, then ``{"requestId", "finishReason", "usage", "done": true}``.

    With ``client_id`` every event also carries ``"id": client_id``; with ``framed=False`` the
    events are bare JSON (one WebSocket frame each) instead of SSE ``data:`` events.
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

    def finish(self, finish_reason: str) -> bytes:
        """Remembered for the closing event, which carries the usage too."""
        self._finish_reason = finish_reason
        return b""

    def usage(self, usage: Usage) -> bytes:
        """The closing event."""
        return self._open + _encode(dict(self._event_head, finishReason=self._finish_reason, usage=_usage(usage),
                                         done=True)) + self._close


def _endpoint(stream: bool) -> completions.Endpoint:
    def parse(raw: bytes, cfg: EdgeConfig) -> ParsedRequest:
        return parse_native(raw, default_max_tokens=cfg.default_max_tokens, stream=stream)

    return completions.Endpoint(id_prefix="inf", parse=parse, body=inference_body, chunks=NativeChunkFormatter)


INFERENCE = _endpoint(stream=False)
INFERENCE_STREAM = _endpoint(stream=True)


async def inference(request: web.Request) -> web.StreamResponse:
    """``POST /api/v1/inference``: one JSON answer."""
    return await completions.serve(request, INFERENCE)


async def inference_stream(request: web.Request) -> web.StreamResponse:
    """``POST /api/v1/inference/stream``: token events over SSE."""
    return await completions.serve(request, INFERENCE_STREAM)


async def list_models(request: web.Request) -> web.Response:
    """``GET /api/v1/models``: the models live engines serve, with context length, aliases and engine count."""
    models: dict[str, dict] = {}
    for state in request.app[EDGE].table.live():
        if state.heartbeat.draining:
            continue
        for m in state.heartbeat.models:
            entry = models.setdefault(m.id, {"modelId": m.id, "contextLength": m.context_length,
                                             "aliases": list(m.aliases), "engines": 0})
            entry["engines"] += 1
    return web.Response(body=_encode({"models": [models[k] for k in sorted(models)]}),
                        content_type="application/json")


async def health_check(request: web.Request) -> web.Response:
    """``GET /api/v1/health``; ``?detail=true`` adds every engine's status."""
    resp = await health.healthz(request)
    if request.query.get("detail", "").lower() not in ("1", "true", "yes"):
        return resp
    body = msgspec.json.decode(resp.body)
    body["engineDetails"] = [
        {"worker": s.worker, "engine": s.heartbeat.engine, "device": s.heartbeat.device,
         "models": [m.id for m in s.heartbeat.models], "slots": s.heartbeat.slots, "inFlight": s.in_flight,
         "draining": s.heartbeat.draining, "memoryBytes": s.heartbeat.memory_bytes,
         "health": s.heartbeat.health, "healthReason": s.heartbeat.health_reason}
        for s in request.app[EDGE].table.live()]
    return web.Response(status=resp.status, body=_encode(body), content_type="application/json")
