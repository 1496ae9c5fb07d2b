"""The ``llm_api_keys`` KV bucket: create, read, list and revoke API key records.

Used by ``./cy keys`` (writes) and the edge (reads). The bucket is provisioned from
``infra/nats/jetstream.toml``; this module binds to it and never creates it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue

from schemas import names
from schemas.auth import ApiKeyRecord, Scope
from services.common.api_keys import hash_key, new_api_key

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(ApiKeyRecord)


class UnknownKeyError(LookupError):
    """No API key record has this id."""


class ApiKeyStore:
    """API key records in KV, one per key id."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @classmethod
    async def bind(cls, js: JetStreamContext) -> ApiKeyStore:
        """Bind to the provisioned bucket (``BucketNotFoundError`` when ``./cy infra apply`` never ran)."""
        return cls(await js.key_value(names.API_KEYS_BUCKET))

    async def create(self, name: str, scopes: Iterable[Scope | str]) -> tuple[ApiKeyRecord, str]:
        """Make a new key; return its record and the key itself (the only time the key exists)."""
        wanted = sorted({Scope(s).value for s in scopes})
        if not wanted:
            raise ValueError("an API key needs at least one scope")
        key_id, key = new_api_key()
        record = ApiKeyRecord(id=key_id, name=name, hash=hash_key(key), scopes=wanted, created=time.time())
        await self.kv.create(key_id, _encoder.encode(record))  # create: never overwrite another key's record
        return record, key

    async def get(self, key_id: str) -> ApiKeyRecord | None:
        """The record of ``key_id``, or ``None`` (also for a deleted one)."""
        try:
            entry = await self.kv.get(key_id)
        except KeyNotFoundError:  # KeyDeletedError is a subclass
            return None
        return _decoder.decode(entry.value) if entry.value else None

    async def records(self) -> list[ApiKeyRecord]:
        """Every record, oldest first."""
        try:
            ids = await self.kv.keys()
        except NoKeysError:
            return []
        records = [r for r in [await self.get(i) for i in ids] if r is not None]
        return sorted(records, key=lambda r: r.created)

    async def revoke(self, key_id: str) -> ApiKeyRecord:
        """Mark ``key_id`` revoked (the record stays, for ``list``); ``UnknownKeyError`` if absent."""
        try:
            entry = await self.kv.get(key_id)
        except KeyNotFoundError:
            raise UnknownKeyError(key_id) from None
        record = _decoder.decode(entry.value)
        if not record.revoked:
            record.revoked, record.revoked_at = True, time.time()
            await self.kv.update(key_id, _encoder.encode(record), last=entry.revision)
        return record
