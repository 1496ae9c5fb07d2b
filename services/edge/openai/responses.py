"""``/v1/responses``: OpenAI's Responses API as a translation of chat completions at the edge.

``POST /v1/responses`` decodes the body, rebuilds the conversation ``previous_response_id`` names
(``ResponseStore.conversation``), translates it into the chat request (``responses_translate``)
and runs that through the one admission path of chat completions (``http.admission``: rate
limits, prompt cache, ``Idempotency-Key``, publishing by priority lane) and the one event pump
(failover, migration, cancel on disconnect): only the answer's shape differs
(``responses_stream``). With ``store`` (the default, as at OpenAI) the finished response and its
input items are kept in KV for ``GET``, ``DELETE`` and ``input_items``, visible only to the
caller that created it.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from aiohttp import web

from schemas import names
from schemas.errors import BusError, ErrorCode
from schemas.inference import InferenceRequest
from schemas.responses import StoredResponse
from services.edge.auth.authenticator import PRINCIPAL
from services.edge.bus.pump import pump
from services.edge.http import admission, json_depth
from services.edge.openai import completions, responses_translate
from services.edge.openai.responses_body import ResponseDraft, item_json
from services.edge.openai.responses_store import ResponseStore
from services.edge.openai.responses_stream import ResponseJsonWriter, ResponseSseWriter, ToolResponseSseWriter
from services.edge.openai.responses_translate import ParsedResponses
from services.edge.openai.responses_types import ResponsesBody
from services.edge.state import EDGE, Edge

log = logging.getLogger(__name__)

ID_PREFIX = "resp"
MAX_LIST = 100  # OpenAI's bound on input_items' limit
DEFAULT_LIST = 20
_encode = msgspec.json.Encoder().encode


def owner_of(request: web.Request) -> str:
    """Whose stored responses a request may see: its API key or JWT subject; everyone's (``""``) without auth."""
    principal = request.get(PRINCIPAL)
    return f"{principal.kind}-{principal.id}" if principal is not None else ""


def store_of(edge: Edge) -> ResponseStore:
    """The responses store, or 503 when its bucket is not provisioned."""
    if edge.responses is None:
        raise BusError(ErrorCode.UNAVAILABLE, f"stored responses need the KV bucket {names.RESPONSES_BUCKET}, which "
                                              "is not provisioned (run ./cy infra apply); send \"store\": false "
                                              "to run without it")
    return edge.responses


async def prepare(edge: Edge, body: ResponsesBody, owner: str) -> tuple[ParsedResponses, InferenceRequest]:
    """A decoded body as the chat request it means, its conversation loaded, with a fresh id and deadline.

    Needs no HTTP request: a batch line goes through here too.
    """
    history = []
    if body.previous_response_id is not None:
        history = await store_of(edge).conversation(body.previous_response_id, owner)
    parsed = responses_translate.translate_body(body, history, default_max_tokens=edge.config.default_max_tokens)
    if parsed.store:
        store_of(edge)  # without the bucket: 503 now, before anything is generated
    return parsed, completions.build_request(edge, parsed.parsed, ID_PREFIX)


def stored(draft: ResponseDraft, body: dict[str, Any], parsed: ParsedResponses, owner: str) -> StoredResponse:
    """The KV record of a finished response."""
    return StoredResponse(id=draft.id, created_at=draft.created, response=msgspec.Raw(_encode(body)), owner=owner,
                          previous_response_id=parsed.previous_response_id, input=parsed.input,
                          output=draft.output_items())


async def create_response(request: web.Request) -> web.StreamResponse:
    """``POST /v1/responses``, streaming (typed SSE events) or not."""
    edge = request.app[EDGE]
    raw = await request.read()
    json_depth.check_depth(raw, edge.config.max_json_depth)
    owner = owner_of(request)
    parsed, req = await prepare(edge, responses_translate.decode_body(raw), owner)

    async def keep(draft: ResponseDraft, body: dict[str, Any]) -> None:
        if not parsed.store:
            return
        try:
            await store_of(edge).put(stored(draft, body, parsed, owner))
        except BusError as err:  # the answer is generated: deliver it; only a later retrieval will miss it
            log.warning("response %s not stored: %s", draft.id, err.message)

    async with admission.admitted(edge, request, req, n=1, stream=parsed.parsed.stream, route=ID_PREFIX,
                                  key=request.headers.get(admission.IDEMPOTENCY_HEADER)) as answer:
        draft = ResponseDraft(response_id=answer.request_id, created=answer.created, model=answer.model,
                              shown=parsed.shown, read_calls=parsed.parsed.read_calls)
        if parsed.parsed.stream:
            writer = (ToolResponseSseWriter if draft.read_calls else ResponseSseWriter)(request, draft, keep)
            await pump(answer.source, writer)
            return writer.response
        json_writer = ResponseJsonWriter(draft)
        await pump(answer.source, json_writer)
    await keep(draft, json_writer.body)
    return json_writer.response


def _refuse_query(request: web.Request, *allowed: str) -> None:
    """Refuse query parameters that would change a stored answer (``stream``, ``include``) or are unknown."""
    for name, value in request.query.items():
        if name == "stream" and value.lower() in ("false", "0", ""):
            continue
        if name == "include_obfuscation" or name in allowed:
            continue
        why = {"stream": "a stored response is not streamed again", "include": "no additional output data is served"}
        raise BusError(ErrorCode.UNSUPPORTED, f"query parameter '{name}' is not supported: "
                                              f"{why.get(name, 'unknown parameter')}", param=name)


async def retrieve_response(request: web.Request) -> web.Response:
    """``GET /v1/responses/{id}``: the stored response object."""
    _refuse_query(request)
    record = await store_of(request.app[EDGE]).get(request.match_info["response_id"], owner_of(request))
    return web.Response(body=bytes(record.response), content_type="application/json")


async def delete_response(request: web.Request) -> web.Response:
    """``DELETE /v1/responses/{id}``: forget a stored response (later reads are 404)."""
    response_id = request.match_info["response_id"]
    await store_of(request.app[EDGE]).delete(response_id, owner_of(request))
    return web.json_response({"id": response_id, "object": "response", "deleted": True})


def _limit(request: web.Request) -> int:
    text = request.query.get("limit", str(DEFAULT_LIST))
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIST:
        raise BusError(ErrorCode.INVALID_REQUEST, f"'limit' must be an integer in [1, {MAX_LIST}], got {text!r}",
                       param="limit")
    return limit


async def list_input_items(request: web.Request) -> web.Response:
    """``GET /v1/responses/{id}/input_items``: the response's input items, newest first unless ``order=asc``."""
    _refuse_query(request, "limit", "order", "after")
    record = await store_of(request.app[EDGE]).get(request.match_info["response_id"], owner_of(request))
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise BusError(ErrorCode.INVALID_REQUEST, f"'order' must be 'asc' or 'desc', got {order!r}", param="order")
    items = record.input if order == "asc" else record.input[::-1]
    after = request.query.get("after")
    if after is not None:
        ids = [item.id for item in items]
        if after not in ids:
            raise BusError(ErrorCode.NOT_FOUND, f"no input item '{after}' in response '{record.id}'", param="after")
        items = items[ids.index(after) + 1:]
    limit = _limit(request)
    page = [item_json(item) for item in items[:limit]]
    return web.json_response({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                              "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit})
