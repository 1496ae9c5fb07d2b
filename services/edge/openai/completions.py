"""``POST /v1/chat/completions`` and ``POST /v1/completions``: validate, resolve, publish, answer."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from schemas import names
from schemas.cache import CachedResponse
from schemas.errors import BusError, ErrorCode
from schemas.events import Usage
from schemas.idempotency import IdempotencyRecord
from schemas.inference import InferenceRequest
from services.common.model_ref import adapter_model_id, split_model
from services.edge.openai import choices, bodies as openai_format, translate as openai_translate
from services.edge.http import json_depth, sse as streaming
from services.edge.auth import rate_limit
from services.edge.openai.choices import ChoiceCalls
from services.edge.config import EdgeConfig
from services.edge.bus.publish import InferenceCall
from services.edge.bus.idempotency import AlreadyFinished, Claimed, IdempotencyStore, request_digest, scoped_key
from services.edge.openai.translate import ParsedRequest
from services.edge.state import EDGE, Edge


# A client's retry with the same value never generates twice (see ``idempotency``).
IDEMPOTENCY_HEADER = "Idempotency-Key"


@dataclass(frozen=True)
class Endpoint:
    """What differs between the chat and the legacy completion endpoints."""

    id_prefix: str
    parse: Callable[[bytes, EdgeConfig], ParsedRequest]
    body: streaming.BodyBuilder
    chunks: type[openai_format.ChunkFormatter]


CHAT = Endpoint(
    id_prefix="chatcmpl",
    parse=lambda raw, cfg: openai_translate.parse_chat(raw, default_max_tokens=cfg.default_max_tokens,
                                                       max_n=cfg.max_choices),
    body=openai_format.chat_completion,
    chunks=openai_format.ChatChunkFormatter,
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


def charged_tokens(call: InferenceCall | ChoiceCalls | None) -> int:
    """The tokens a finished call costs its caller's budget (0 if it ended without usage).

    For ``n`` choices: the usage the client is shown, the prompt once plus every choice's completion.
    """
    return call.usage.total_tokens if call is not None and call.usage is not None else 0


async def serve(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    """Validate, resolve the model, publish and answer one request of ``endpoint``'s kind."""
    edge = request.app[EDGE]
    parsed = parse_body(await request.read(), endpoint, edge.config)
    req = build_request(edge, parsed, endpoint.id_prefix)
    admission = await rate_limit.admit_request(edge.limiter, request, stream=parsed.stream)
    created = int(req.created)
    shown = adapter_model_id(req.model, req.adapter)  # a fine-tuned model is answered under the name asked for
    timeout = req.deadline - req.created
    call = claim = hit = None
    try:
        if parsed.n > 1 or req.sampling.logprobs is not None:
            _check_not_idempotent(request, "n" if parsed.n > 1 else "logprobs")
        if parsed.n > 1:
            call = ChoiceCalls(edge.publisher, openai_translate.choice_requests(req, parsed.n, edge.router.reply_to),
                               timeout)
            async with call:
                return await _answer_choices(request, endpoint, parsed, req, call, created=created, model=shown)
        # A hit is answered here; with an Idempotency-Key the request takes the queue as before (its record).
        if edge.cache is not None and IDEMPOTENCY_HEADER not in request.headers:
            hit = await edge.cache.find(req)
            if hit is not None:
                return await _answer_hit(request, endpoint, parsed, req, hit, created=created, model=shown)
        keyed = await _claim(edge, request, endpoint, req, stream=parsed.stream)
        if isinstance(keyed, AlreadyFinished):  # a retry of a request that already finished: the same answer again
            return await _replay(request, endpoint, parsed, keyed.record)
        claim = keyed
        async with edge.publisher.call(req, timeout, claim.msg_id if claim else None) as call:
            if parsed.stream:
                fmt = endpoint.chunks(request_id=req.id, created=created, model=shown,
                                      include_usage=parsed.include_usage)
                return await streaming.stream(request, call, fmt)
            return await streaming.collect(call, endpoint.body, created=created, model=shown)
    finally:
        if claim is not None and edge.idempotency is not None:
            _settle(edge.idempotency, claim, call, req, request_digest(req), created=created, model=shown)
        await admission.finish(hit.usage.total_tokens if hit is not None else charged_tokens(call))


async def _answer_choices(request: web.Request, endpoint: Endpoint, parsed: ParsedRequest, req: InferenceRequest,
                          calls: ChoiceCalls, *, created: int, model: str) -> web.StreamResponse:
    if parsed.stream:
        fmts = [endpoint.chunks(request_id=req.id, created=created, model=model,
                                include_usage=parsed.include_usage, index=i) for i in range(parsed.n)]
        return await choices.stream(request, calls, fmts)
    return await choices.collect(calls, endpoint.body, request_id=req.id, created=created, model=model,
                                 logprobs=req.sampling.logprobs is not None)


def _check_not_idempotent(request: web.Request, param: str) -> None:
    """An ``Idempotency-Key`` record keeps one choice's text only: refuse rather than replay a partial answer."""
    if IDEMPOTENCY_HEADER in request.headers:
        raise BusError(ErrorCode.UNSUPPORTED, f"'{IDEMPOTENCY_HEADER}' cannot be combined with '{param}' "
                                              f"(a stored answer keeps one choice's text only)", param=param)


async def _claim(edge: Edge, request: web.Request, endpoint: Endpoint, req: InferenceRequest, *,
                 stream: bool) -> Claimed | AlreadyFinished | None:
    """Claim the request's ``Idempotency-Key`` (None without one); see ``idempotency``."""
    header = request.headers.get(IDEMPOTENCY_HEADER)
    if header is None:
        return None
    key = scoped_key(rate_limit.caller_of(request)[0], endpoint.id_prefix, header)
    if edge.idempotency is None:  # no bucket: JetStream's duplicate window alone (a retry gets 409)
        return Claimed(key, names.idempotency_msg_id(key, 0), 0)
    return await edge.idempotency.claim(key, request_digest(req), req, wait=not stream)


def _settle(store: IdempotencyStore, claim: Claimed, call: InferenceCall | None, req: InferenceRequest,
            body_sha: str, *, created: int, model: str) -> None:
    if call is not None and call.usage is not None and call.finish_reason:
        store.finish(claim, req, body_sha, created=created, model=model, text=call.text,
                     finish_reason=call.finish_reason, usage=call.usage)
    else:
        store.fail(claim, req, body_sha)


async def _answer_hit(request: web.Request, endpoint: Endpoint, parsed: ParsedRequest, req: InferenceRequest,
                      hit: CachedResponse, *, created: int, model: str) -> web.StreamResponse:
    """Answer ``req`` from a prompt-cache entry: the same bytes as a hit the scheduler replays.

    (Replayed, a hit arrives as its stored deltas, or one joined delta when not streamed, then
    its stored finish reason and usage; ``streaming.collect``/``stream`` render them as below.)
    """
    if not parsed.stream:
        body = endpoint.body(request_id=req.id, created=created, model=model,
                             text="".join(d.text for d in hit.deltas), finish_reason=hit.finish_reason,
                             usage=hit.usage)
        return web.Response(body=body, content_type="application/json")
    fmt = endpoint.chunks(request_id=req.id, created=created, model=model, include_usage=parsed.include_usage)
    return await streaming.replay(request, fmt, [d.text for d in hit.deltas], hit.finish_reason, hit.usage)


async def _replay(request: web.Request, endpoint: Endpoint, parsed: ParsedRequest,
                  record: IdempotencyRecord) -> web.StreamResponse:
    usage = record.usage or Usage(prompt_tokens=0, completion_tokens=0)
    if not parsed.stream:
        body = endpoint.body(request_id=record.request_id, created=record.created, model=record.model,
                             text=record.text, finish_reason=record.finish_reason, usage=usage)
        return web.Response(body=body, content_type="application/json")
    fmt = endpoint.chunks(request_id=record.request_id, created=record.created, model=record.model,
                          include_usage=parsed.include_usage)
    return await streaming.replay(request, fmt, [record.text], record.finish_reason, usage)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """OpenAI chat completions, streaming (SSE) or not."""
    return await serve(request, CHAT)


async def completions(request: web.Request) -> web.StreamResponse:
    """OpenAI legacy text completions, streaming (SSE) or not."""
    return await serve(request, COMPLETION)
