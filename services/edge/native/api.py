"""The native API of the seed documents: ``/api/v1/inference``, ``/inference/stream``, ``/models``, ``/health``.

Same schema messages underneath as the OpenAI endpoints: a native body is validated into the
same ``ParsedRequest`` and served by the same code; only the field names and the response
shapes differ (camelCase, as the seed's Gateway spoke).
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from schemas.errors import BusError, ErrorCode
from services.edge.openai import completions, tools as openai_tools
from services.edge.system import health
from services.edge.config import EdgeConfig
from services.edge.native import tools as native_tools
from services.edge.native.answers import (  # noqa: F401 - NativeChunkFormatter: the socket's formatter
    NativeChunkFormatter,
    NativeToolChunkFormatter,
    inference_body,
    inference_tool_body,
)
from services.edge.native.types import NativeInferenceBody
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
    sampling = _sampling(gen, gen.max_new_tokens, default_max_tokens, "generation.max_new_tokens")
    structured = from_response_format(body.responseFormat, "responseFormat")
    messages = _messages(body.messages) if body.messages is not None else None
    plan = native_tools.plan(body, structured)
    if messages is not None:  # earlier calls and results are written in even when no tools are offered now
        messages = openai_tools.render(messages, body.messages, plan.functions if plan is not None else [])
    if plan is not None:
        structured = plan.structured or structured
    return ParsedRequest(
        model=model, messages=messages, prompt=body.prompt, sampling=sampling, stream=stream, include_usage=True,
        priority=body.priority, adapter=body.adapter or None, user=body.user, timeout=body.timeout, cache=body.cache,
        structured=structured, read_calls=plan is not None and plan.read_calls)


def _endpoint(stream: bool) -> completions.Endpoint:
    def parse(raw: bytes, cfg: EdgeConfig) -> ParsedRequest:
        return parse_native(raw, default_max_tokens=cfg.default_max_tokens, stream=stream)

    return completions.Endpoint(id_prefix="inf", parse=parse, body=inference_body, chunks=NativeChunkFormatter,
                                tool_writers=lambda parsed: (inference_tool_body, NativeToolChunkFormatter))


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
