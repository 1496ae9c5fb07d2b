"""The one admission path of every generation request: chat, completions, the native API, WebSocket frames.

``admitted(edge, request, req, ...)`` takes a request the edge validated and resolved
(``completions.build_request``) through, in this order:

- auth and scope: checked by the auth middleware before any handler runs (a WebSocket's at its
  upgrade: each request frame on it acts for that credential and spends its budgets);
- rate limits (429 + ``Retry-After``; ``x-ratelimit-*`` headers on an HTTP answer);
- ``Idempotency-Key`` refusals (``n`` > 1, ``logprobs``: its record keeps one choice's text);
- the edge's prompt-cache lookup (``bus.cache_hits``; not with a key, not for ``n`` > 1): a hit is
  answered at once, charged its stored usage;
- the key's claim (``bus.idempotency``): a retry of a finished request gets its stored answer;
- publishing (one request, or one per choice): a full queue is 429 ``queue_full``.

It yields an ``Admitted``: the ``pump.Source`` to answer from and the id, time and model the
answer is shown under. Leaving it stores a keyed request's outcome and charges the tokens used.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from schemas import names
from schemas.errors import BusError, ErrorCode
from schemas.events import Usage
from schemas.inference import InferenceRequest
from services.common.model_ref import adapter_model_id
from services.edge.auth import rate_limit
from services.edge.bus.idempotency import AlreadyFinished, Claimed, IdempotencyStore, request_digest, scoped_key
from services.edge.bus.publish import InferenceCall
from services.edge.bus.pump import Source, StoredAnswer
from services.edge.openai import translate as openai_translate
from services.edge.openai.choices import ChoiceCalls
from services.edge.state import Edge

# A client's retry with the same value never generates twice (see ``idempotency``).
IDEMPOTENCY_HEADER = "Idempotency-Key"


@dataclass(frozen=True, slots=True)
class Admitted:
    """What an admitted request is answered from, and the id, ``created`` and model its answer shows."""

    source: Source | StoredAnswer
    request_id: str
    created: int
    model: str


@contextlib.asynccontextmanager
async def admitted(edge: Edge, request: web.Request, req: InferenceRequest, *, n: int, stream: bool, route: str,
                   key: str | None) -> AsyncIterator[Admitted]:
    """Admit ``req`` (``n`` choices) for the caller of ``request``; ``key`` is its ``Idempotency-Key``.

    ``route`` scopes the key (with the caller). A request cancelled or failed while inside is
    cancelled on the bus (``InferenceCall``) and its key's record marked failed.
    """
    admission = await rate_limit.admit_request(edge.limiter, request, stream=stream)
    shown = adapter_model_id(req.model, req.adapter)  # a fine-tuned model is answered under the name asked for
    created = int(req.created)
    source: Source | None = None  # the request on the bus, once published
    claim: Claimed | None = None
    charged = 0  # a hit is charged its stored usage; a replayed record was charged when it ran
    try:
        if key is not None and (n > 1 or req.sampling.logprobs is not None):
            param = "n" if n > 1 else "logprobs"
            raise BusError(ErrorCode.UNSUPPORTED, f"'{IDEMPOTENCY_HEADER}' cannot be combined with '{param}' "
                                                  f"(a stored answer keeps one choice's text only)", param=param)
        if n > 1:
            requests = openai_translate.choice_requests(req, n, edge.router.reply_to)
            async with ChoiceCalls(edge.publisher, requests, req.deadline - req.created) as source:
                for call in source.calls:
                    call.watch_client(request.protocol)
                yield Admitted(source, req.id, created, shown)
            return
        if edge.cache is not None and key is None:
            hit = await edge.cache.find(req)
            if hit is not None:
                texts = [d.text for d in hit.deltas] if stream else ["".join(d.text for d in hit.deltas)]
                stored = StoredAnswer(texts, hit.finish_reason, hit.usage)
                charged = hit.usage.total_tokens
                yield Admitted(stored, req.id, created, shown)
                return
        keyed = await _claim(edge, request, route, req, key, stream=stream)
        if isinstance(keyed, AlreadyFinished):  # a retry of a request that already finished: the same answer again
            record = keyed.record
            usage = record.usage or Usage(prompt_tokens=0, completion_tokens=0)
            yield Admitted(StoredAnswer([record.text], record.finish_reason, usage), record.request_id,
                           record.created, record.model)
            return
        claim = keyed
        async with edge.publisher.call(req, req.deadline - req.created, claim.msg_id if claim else None) as source:
            source.watch_client(request.protocol)
            yield Admitted(source, req.id, created, shown)
    finally:
        if claim is not None and edge.idempotency is not None:
            _settle(edge.idempotency, claim, source, req, created=created, model=shown)
        if source is not None and source.usage is not None:
            charged = source.usage.total_tokens
        await admission.finish(charged)


async def _claim(edge: Edge, request: web.Request, route: str, req: InferenceRequest, key: str | None, *,
                 stream: bool) -> Claimed | AlreadyFinished | None:
    """Claim the request's ``Idempotency-Key`` (None without one); see ``idempotency``."""
    if key is None:
        return None
    scoped = scoped_key(rate_limit.caller_of(request)[0], route, key)
    if edge.idempotency is None:  # no bucket: JetStream's duplicate window alone (a retry gets 409)
        return Claimed(scoped, names.idempotency_msg_id(scoped, 0), 0)
    return await edge.idempotency.claim(scoped, request_digest(req), req, wait=not stream)


def _settle(store: IdempotencyStore, claim: Claimed, call: InferenceCall | None, req: InferenceRequest, *, created: int,
            model: str) -> None:
    """Store the keyed request's answer if it finished, else mark its run failed (a retry runs again)."""
    body_sha = request_digest(req)
    if call is not None and call.usage is not None and call.finish_reason:
        store.finish(claim, req, body_sha, created=created, model=model, text=call.text,
                     finish_reason=call.finish_reason, usage=call.usage)
    else:
        store.fail(claim, req, body_sha)
