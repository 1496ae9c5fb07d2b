"""``POST /v1/chat/completions`` and ``POST /v1/completions``: validate, resolve, admit, answer."""

from __future__ import annotations

import dataclasses
import functools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from schemas.errors import BusError, ErrorCode
from schemas.inference import InferenceRequest
from services.common.model_ref import split_model
from services.edge.openai import bodies as openai_format, tool_answers, translate as openai_translate
from services.edge.http import admission, json_depth, sse as streaming
from services.edge.config import EdgeConfig
from services.edge.bus.pump import pump
from services.edge.openai.translate import ParsedRequest
from services.edge.state import EDGE, Edge


# The body builder and chunk formatter of an answer read for tool calls.
ToolWriters = Callable[[ParsedRequest], tuple[streaming.BodyBuilder, type[openai_format.ChunkFormatter]]]


@dataclass(frozen=True)
class Endpoint:
    """What differs between the chat and the legacy completion endpoints."""

    id_prefix: str
    parse: Callable[[bytes, EdgeConfig], ParsedRequest]
    body: streaming.BodyBuilder
    chunks: type[openai_format.ChunkFormatter]
    tool_writers: ToolWriters | None = None  # None: the endpoint takes no tools


def _chat_tool_writers(parsed: ParsedRequest) -> tuple[streaming.BodyBuilder, type[openai_format.ChunkFormatter]]:
    """A chat answer read for calls: ``tool_calls`` (or, asked with ``functions``, the legacy ``function_call``)."""
    if parsed.legacy_calls:
        return (functools.partial(openai_format.chat_completion, message=tool_answers.function_message),
                tool_answers.FunctionChunkFormatter)
    return (functools.partial(openai_format.chat_completion, message=tool_answers.tool_message),
            tool_answers.ToolChunkFormatter)


CHAT = Endpoint(
    id_prefix="chatcmpl",
    parse=lambda raw, cfg: openai_translate.parse_chat(raw, default_max_tokens=cfg.default_max_tokens,
                                                       max_n=cfg.max_choices),
    body=openai_format.chat_completion,
    chunks=openai_format.ChatChunkFormatter,
    tool_writers=_chat_tool_writers,
)
COMPLETION = Endpoint(
    id_prefix="cmpl",
    parse=lambda raw, cfg: openai_translate.parse_completion(
        raw, default_max_tokens=cfg.default_completion_max_tokens, max_n=cfg.max_choices),
    body=openai_format.text_completion,
    chunks=openai_format.CompletionChunkFormatter,
)


def parse_body(raw: bytes, endpoint: Endpoint, config: EdgeConfig) -> ParsedRequest:
    """Validate a request body (its nesting depth first) into the request every endpoint shares."""
    json_depth.check_depth(raw, config.max_json_depth)
    return endpoint.parse(raw, config)


def build_request(edge: Edge, parsed: ParsedRequest, id_prefix: str) -> InferenceRequest:
    """Resolve the model (``<base>:<adapter>`` split here) and build the bus message, with a fresh id,
    reply subject and deadline."""
    edge.check_accepting()
    base, adapter = split_model(parsed.model, parsed.adapter, lambda name: _known(edge, name) is not None)
    model_id = _known(edge, base)
    if model_id is None:
        raise BusError(ErrorCode.MODEL_NOT_FOUND, f"The model '{base}' does not exist or no engine "
                                                  "serves it now (see GET /v1/models)", param="model")
    if adapter != parsed.adapter:
        parsed = dataclasses.replace(parsed, adapter=adapter)
    request_id = f"{id_prefix}-{uuid.uuid4().hex}"
    now = time.time()
    timeout = parsed.timeout or edge.config.request_timeout
    return openai_translate.to_request(parsed, request_id=request_id, model=model_id,
                                       reply_to=edge.router.reply_to(request_id), created=now,
                                       deadline=now + timeout)


def _known(edge: Edge, name: str) -> str | None:
    """The canonical id of a model a live engine serves, or the registry knows (the scheduler cold-starts it)."""
    served = edge.table.resolve(name)
    return served.id if served is not None else edge.registry.resolve(name)


async def serve(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    """Validate, resolve the model, admit (``admission``) and answer one request of ``endpoint``'s kind."""
    edge = request.app[EDGE]
    parsed = parse_body(await request.read(), endpoint, edge.config)
    req = build_request(edge, parsed, endpoint.id_prefix)
    async with admission.admitted(edge, request, req, n=parsed.n, stream=parsed.stream, route=endpoint.id_prefix,
                                  key=request.headers.get(admission.IDEMPOTENCY_HEADER)) as answer:
        writer = _writer(request, endpoint, parsed, req, answer)
        await pump(answer.source, writer)
        return writer.response


def _writer(request: web.Request, endpoint: Endpoint, parsed: ParsedRequest, req: InferenceRequest,
            answer: admission.Admitted) -> streaming.SseWriter | streaming.JsonWriter:
    """The writer of ``answer`` in the format the request asked for: SSE chunks (one formatter per choice) or JSON."""
    shown = {"request_id": answer.request_id, "created": answer.created, "model": answer.model}
    body, chunks = endpoint.body, endpoint.chunks
    if parsed.read_calls and endpoint.tool_writers is not None:
        body, chunks = endpoint.tool_writers(parsed)
    if parsed.stream:
        return streaming.SseWriter(request, [chunks(**shown, include_usage=parsed.include_usage, index=i)
                                             for i in range(parsed.n)])
    return streaming.JsonWriter(body, **shown, width=parsed.n, logprobs=req.sampling.logprobs is not None)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """OpenAI chat completions, streaming (SSE) or not."""
    return await serve(request, CHAT)


async def completions(request: web.Request) -> web.StreamResponse:
    """OpenAI legacy text completions, streaming (SSE) or not."""
    return await serve(request, COMPLETION)
