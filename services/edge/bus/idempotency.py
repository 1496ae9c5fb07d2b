"""``Idempotency-Key``: a client's retry within the duplicate window never generates twice.

The key, scoped to the caller (API key, JWT subject or address) and the route, is hashed into a
KV key of ``llm_idempotency`` and into the request's ``Nats-Msg-Id``. The first request claims
the record with a compare-and-set create (one winner across every edge replica), publishes, and
on its end stores the finished response (or ``failed``). A retry with the same key:

- finished: gets the stored response again, with the same id: as JSON, or replayed as one SSE
  stream (role, the whole text, finish, usage, ``[DONE]``) when it asks to stream;
- running, not streaming: waits for the first to finish (up to its own timeout) and answers the same;
- running, streaming: ``409 conflict`` at once — a stream cannot be joined half way, and waiting
  silently before the first byte would look like a hang; retry after it finished to get the replay;
- failed (or running past its deadline: its edge died): runs again, as run ``n + 1`` with its own
  ``Nats-Msg-Id`` (a failure generated nothing the client has);
- a different request (model, messages, sampling; streaming or not does not count):
  ``400 invalid_request`` (the key names one request).

Records live for the bucket's TTL, which equals ``LLM_INFER``'s duplicate window.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass

import msgspec
import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from schemas import names
from schemas.errors import BusError, ErrorCode
from schemas.events import Usage, encode
from schemas.idempotency import IdempotencyRecord
from schemas.inference import InferenceRequest

log = logging.getLogger(__name__)

_decoder = msgspec.json.Decoder(IdempotencyRecord)
_POLL = 0.05  # seconds between looks at a running record while a retry waits for it
_MAX_KEY_CHARS = 255

RUNNING, DONE, FAILED = "running", "done", "failed"


@dataclass(frozen=True)
class Claimed:
    """This request runs under the key: publish it with ``msg_id``, then ``finish`` or ``fail``."""

    key: str
    msg_id: str
    run: int


@dataclass(frozen=True)
class AlreadyFinished:
    """The key's request already finished: answer with ``record`` (state ``done``)."""

    record: IdempotencyRecord


def scoped_key(caller: str, route: str, key: str) -> str:
    """The KV key (and ``Nats-Msg-Id`` root) of ``key`` sent by ``caller`` to ``route``."""
    if not key or len(key) > _MAX_KEY_CHARS:
        raise BusError(ErrorCode.INVALID_REQUEST, f"Idempotency-Key must be 1 to {_MAX_KEY_CHARS} characters",
                       param="Idempotency-Key")
    return hashlib.sha256(f"{caller}\0{route}\0{key}".encode()).hexdigest()


def request_digest(req: InferenceRequest) -> str:
    """SHA-256 of what a request asks for (not its id, times or ``stream``): the same key with another
    request is refused, while a retry may switch between streaming and not."""
    what = msgspec.structs.replace(req, id="", reply_to="", created=0.0, deadline=0.0, stream=True)
    return hashlib.sha256(encode(what)).hexdigest()


class IdempotencyStore:
    """Claims, waits for and settles keyed requests in the ``llm_idempotency`` bucket."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self._settling: set[asyncio.Task[None]] = set()

    async def claim(self, key: str, body_sha: str, req: InferenceRequest, *,
                    wait: bool) -> Claimed | AlreadyFinished:
        """Claim ``key`` for ``req``, or return the finished response; ``wait`` for a running one or 409."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + max(0.0, req.deadline - time.time())
        record = IdempotencyRecord(state=RUNNING, request_id=req.id, body_sha=body_sha, deadline=req.deadline)
        while True:
            try:
                await self._kv.create(key, encode(record))
                return Claimed(key, names.idempotency_msg_id(key, 0), 0)
            except nats.js.errors.KeyWrongLastSequenceError:
                pass
            try:
                entry = await self._kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                continue  # expired or deleted in between: try to create it again
            held = _decoder.decode(entry.value)
            if held.body_sha != body_sha:
                raise BusError(ErrorCode.INVALID_REQUEST, "this Idempotency-Key was used for a different request "
                                                          "body", param="Idempotency-Key")
            if held.state == DONE:
                return AlreadyFinished(held)
            if held.state == FAILED or held.deadline < time.time():
                run = held.run + 1
                try:
                    await self._kv.update(key, encode(msgspec.structs.replace(record, run=run)),
                                          last=entry.revision)
                    return Claimed(key, names.idempotency_msg_id(key, run), run)
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue  # another retry took it over first
            if not wait:
                raise BusError(ErrorCode.CONFLICT, "a request with this Idempotency-Key is still running; retry "
                                                   "once it finished to receive its response")
            if loop.time() >= give_up:
                raise BusError(ErrorCode.TIMEOUT, "the request with this Idempotency-Key did not finish within "
                                                  "this request's timeout")
            await asyncio.sleep(_POLL)

    def finish(self, claim: Claimed, req: InferenceRequest, body_sha: str, *, created: int, model: str, text: str,
               finish_reason: str, usage: Usage) -> None:
        """Store the finished response under the claimed key (in the background)."""
        self._put(claim.key, IdempotencyRecord(state=DONE, request_id=req.id, body_sha=body_sha,
                                               deadline=req.deadline, run=claim.run, created=created, model=model,
                                               text=text, finish_reason=finish_reason, usage=usage))

    def fail(self, claim: Claimed, req: InferenceRequest, body_sha: str) -> None:
        """Mark the run failed, so a retry runs again (in the background)."""
        self._put(claim.key, IdempotencyRecord(state=FAILED, request_id=req.id, body_sha=body_sha,
                                               deadline=req.deadline, run=claim.run))

    def _put(self, key: str, record: IdempotencyRecord) -> None:
        # A task of its own: the HTTP handler may be cancelled (client gone) while this is written.
        task = asyncio.create_task(self._write(key, record))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _write(self, key: str, record: IdempotencyRecord) -> None:
        try:
            await self._kv.put(key, encode(record))
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            # A retry then sees "running" until the deadline, and runs again after it.
            log.warning("idempotency record %s not stored (%s): %s", key[:12], record.state, exc)
