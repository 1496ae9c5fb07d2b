"""Stored ``/v1/responses`` responses in KV ``llm_responses``: keep, read, delete, follow a chain.

Each record (``schemas.responses.StoredResponse``, key: the response id) is written with its own
TTL (the edge's ``--responses-ttl``; the bucket allows per-message TTLs), and is visible only to
the caller that created it (``owner``: the API key or JWT subject; empty without auth): any other
caller gets the same 404 as for an id that never existed, so ids cannot be probed.
"""

from __future__ import annotations

import logging

import msgspec
import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from schemas import names
from schemas.errors import BusError, ErrorCode
from schemas.events import encode
from schemas.responses import ResponseItem, StoredResponse

log = logging.getLogger(__name__)

_decoder = msgspec.json.Decoder(StoredResponse)
MAX_CHAIN = 1000  # responses one previous_response_id chain may hold (a bound on the walk)
_BUS = (nats.errors.Error, nats.js.errors.Error, TimeoutError)


def _not_found(response_id: str, param: str | None) -> BusError:
    return BusError(ErrorCode.NOT_FOUND, f"no stored response with id '{response_id}' (it was never stored, "
                                         "was deleted, or expired)", param=param)


def _unavailable(exc: Exception) -> BusError:
    return BusError(ErrorCode.UNAVAILABLE, f"the responses store ({names.RESPONSES_BUCKET}) did not answer: "
                                           f"{type(exc).__name__}")


class ResponseStore:
    """Stored responses of one edge's callers (``ttl``: seconds each is kept)."""

    def __init__(self, kv: KeyValue, ttl: float) -> None:
        self._kv = kv
        self.ttl = ttl

    async def put(self, record: StoredResponse) -> None:
        """Store ``record`` for ``ttl`` seconds (a replayed ``Idempotency-Key`` answer finds it there already)."""
        try:
            await self._kv.create(names.token(record.id), encode(record), msg_ttl=self.ttl)
        except nats.js.errors.KeyWrongLastSequenceError:
            pass  # the same response, stored by its first run
        except _BUS as exc:
            raise _unavailable(exc) from None

    async def get(self, response_id: str, owner: str, param: str | None = None) -> StoredResponse:
        """The record of ``response_id`` if ``owner`` may see it, else ``not_found`` (404)."""
        try:
            key = names.token(response_id)
        except ValueError:
            raise _not_found(response_id, param) from None
        try:
            entry = await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            raise _not_found(response_id, param) from None
        except _BUS as exc:
            raise _unavailable(exc) from None
        record = _decoder.decode(entry.value)
        if record.owner != owner:
            raise _not_found(response_id, param)
        return record

    async def delete(self, response_id: str, owner: str) -> None:
        """Remove ``response_id`` (``not_found`` if ``owner`` cannot see it); its purge marker expires too."""
        await self.get(response_id, owner)
        try:
            await self._kv.purge(names.token(response_id), msg_ttl=self.ttl)
        except _BUS as exc:
            raise _unavailable(exc) from None

    async def conversation(self, response_id: str, owner: str) -> list[ResponseItem]:
        """Every input and output item of the chain ending at ``response_id``, oldest first.

        A response in the chain that is gone (deleted, expired) ends it as a 404 naming
        ``previous_response_id``: the conversation it stood for cannot be rebuilt.
        """
        turns: list[list[ResponseItem]] = []
        at: str | None = response_id
        while at is not None:
            if len(turns) >= MAX_CHAIN:
                raise BusError(ErrorCode.INVALID_REQUEST, f"the conversation of '{response_id}' is longer than "
                                                          f"{MAX_CHAIN} responses", param="previous_response_id")
            record = await self.get(at, owner, "previous_response_id")
            turns.append(record.input + record.output)
            at = record.previous_response_id
        return [item for turn in reversed(turns) for item in turn]
