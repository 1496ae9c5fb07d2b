"""``POST /tokenize`` and ``POST /detokenize`` (vLLM's shapes): answered by an engine serving the model.

The edge has no tokenizer: it resolves the model as inference does (aliases, ``<base>:<adapter>``,
whose adapter shares its base's tokenizer), picks a live engine serving it from the worker table
and sends a ``tokenize``/``detokenize`` command to that engine's control subject
(``llm.v1.engine.<worker>.control``). The engine renders ``messages`` exactly as generation does,
so ``count`` is the prompt's token count in ``usage``. Both need the ``inference`` scope.
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from schemas.control import Detokenize, Tokenize
from schemas.errors import BusError, ErrorCode
from services.common.model_ref import split_model
from services.edge.openai.model_admin import control
from services.edge.openai.translate import _decode, _messages
from services.edge.openai.types import MessageBody
from services.edge.state import EDGE, Edge

TOKENS_TIMEOUT = 30.0  # tokenizing is quick; a loaded 2-core machine can still take seconds to answer
_encode = msgspec.json.Encoder().encode


class TokenizeBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The body of ``POST /tokenize``: ``prompt`` (completion text) or ``messages`` (a chat)."""

    model: str
    prompt: str | None = None
    messages: list[MessageBody] | None = None
    add_generation_prompt: bool = True


class DetokenizeBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The body of ``POST /detokenize``."""

    model: str
    tokens: list[int]


_tokenize_decoder = msgspec.json.Decoder(TokenizeBody)
_detokenize_decoder = msgspec.json.Decoder(DetokenizeBody)


def _json(body: object) -> web.Response:
    return web.Response(body=_encode(body), content_type="application/json")


def pick_engine(edge: Edge, name: str) -> tuple[str, str]:
    """``(model id, worker)``: the served model ``name`` resolves to, on the live engine with the most free
    slots; ``model_not_found`` for a name nobody knows, ``unavailable`` when no live engine has it loaded."""
    base, _adapter = split_model(name, None, lambda n: edge.table.resolve(n) is not None)
    served = edge.table.resolve(base)
    if served is None:
        registered = edge.registry.resolve(base)
        if registered is None:
            raise BusError(ErrorCode.MODEL_NOT_FOUND, f"The model '{base}' does not exist (see GET /v1/models)",
                           param="model")
        raise BusError(ErrorCode.UNAVAILABLE, f"no live engine has '{registered}' loaded to tokenize with "
                                              "(load it with POST /v1/models/load)")
    candidates = edge.table.candidates(served.id)
    if not candidates:
        raise BusError(ErrorCode.UNAVAILABLE, f"no live engine serving '{served.id}' takes commands now")
    best = max(candidates, key=lambda s: (s.free_slots, s.worker))
    return served.id, best.worker


async def tokenize(request: web.Request) -> web.Response:
    """``POST /tokenize`` ``{"model", "prompt" | "messages", "add_generation_prompt"}``: the token ids the
    model sees, their count and the model's context length."""
    edge = request.app[EDGE]
    body: TokenizeBody = _decode(_tokenize_decoder, await request.read())
    if (body.prompt is None) == (body.messages is None):
        raise BusError(ErrorCode.INVALID_REQUEST, "give exactly one of 'prompt' or 'messages'", param="prompt")
    messages = _messages(body.messages) if body.messages is not None else None
    model, worker = pick_engine(edge, body.model)
    command = Tokenize(model=model, prompt=body.prompt, messages=messages,
                       add_generation_prompt=body.add_generation_prompt)
    reply = await control(edge.nc, edge.table, worker, command, TOKENS_TIMEOUT)
    tokens = reply.tokens or []
    return _json({"tokens": tokens, "count": len(tokens), "max_model_len": reply.max_model_len})


async def detokenize(request: web.Request) -> web.Response:
    """``POST /detokenize`` ``{"model", "tokens"}``: the text the token ids stand for."""
    edge = request.app[EDGE]
    body: DetokenizeBody = _decode(_detokenize_decoder, await request.read())
    model, worker = pick_engine(edge, body.model)
    reply = await control(edge.nc, edge.table, worker, Detokenize(model=model, tokens=body.tokens), TOKENS_TIMEOUT)
    return _json({"prompt": reply.prompt or ""})
