"""``POST /v1/chat/completions`` and ``POST /v1/completions``: validate, resolve, publish, answer."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from schemas.errors import BusError, ErrorCode
from services.edge import openai_format, openai_translate, streaming
from services.edge.config import EdgeConfig
from services.edge.openai_translate import ParsedRequest
from services.edge.state import EDGE


@dataclass(frozen=True)
class Endpoint:
    """What differs between the chat and the legacy completion endpoints."""

    id_prefix: str
    parse: Callable[[bytes, EdgeConfig], ParsedRequest]
    body: streaming.BodyBuilder
    chunks: type[openai_format.ChunkFormatter]


CHAT = Endpoint(
    id_prefix="chatcmpl",
    parse=lambda raw, cfg: openai_translate.parse_chat(raw, default_max_tokens=cfg.default_max_tokens),
    body=openai_format.chat_completion,
    chunks=openai_format.ChatChunkFormatter,
)
COMPLETION = Endpoint(
    id_prefix="cmpl",
    parse=lambda raw, cfg: openai_translate.parse_completion(
        raw, default_max_tokens=cfg.default_completion_max_tokens),
    body=openai_format.text_completion,
    chunks=openai_format.CompletionChunkFormatter,
)


async def serve(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    """Validate, resolve the model, publish and answer one request of ``endpoint``'s kind."""
    edge = request.app[EDGE]
    parsed = endpoint.parse(await request.read(), edge.config)
    edge.check_accepting()
    model = edge.table.resolve(parsed.model)
    if model is None:
        raise BusError(ErrorCode.MODEL_NOT_FOUND, f"The model '{parsed.model}' does not exist or no engine "
                                                  "serves it now (see GET /v1/models)", param="model")
    request_id = f"{endpoint.id_prefix}-{uuid.uuid4().hex}"
    now = time.time()
    timeout = parsed.timeout or edge.config.request_timeout
    req = openai_translate.to_request(parsed, request_id=request_id, model=model.id,
                                      reply_to=edge.router.reply_to(request_id), created=now, deadline=now + timeout)
    created = int(now)
    async with edge.dispatcher.call(req, timeout) as call:
        if parsed.stream:
            fmt = endpoint.chunks(request_id=request_id, created=created, model=model.id,
                                  include_usage=parsed.include_usage)
            return await streaming.stream(request, call, fmt)
        return await streaming.collect(call, endpoint.body, created=created, model=model.id)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """OpenAI chat completions, streaming (SSE) or not."""
    return await serve(request, CHAT)


async def completions(request: web.Request) -> web.StreamResponse:
    """OpenAI legacy text completions, streaming (SSE) or not."""
    return await serve(request, COMPLETION)
