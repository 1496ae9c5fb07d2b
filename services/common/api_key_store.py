"""The ``llm_api_keys`` KV bucket: create, read, list, revoke API key records and set their rate limits.

Used by ``./cy keys`` (writes) and the edge (reads). The bucket is provisioned from
``infra/nats/jetstream.toml``; this module binds to it and never creates it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from schemas import names
from schemas.auth import ApiKeyRecord, Scope
from services.common.api_keys import hash_key, new_api_key
from services.common.buckets import kv_keys

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(ApiKeyRecord)


# Attempts at a compare-and-set update of a record that another writer keeps changing.
_UPDATE_ATTEMPTS = 5


class UnknownKeyError(LookupError):
    """No API key record has this id."""


@dataclass(frozen=True)
class KeyLimits:
    """A key's own budgets: requests/min, tokens/min, concurrent streams. ``None``: the edge's
    default (``--rate-*``); 0: unlimited."""

    rpm: int | None = None
    tpm: int | None = None
    streams: int | None = None

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "streams"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be 0 (unlimited) or more, not {value}")


def _with_limits(record: ApiKeyRecord, limits: KeyLimits) -> ApiKeyRecord:
    return msgspec.structs.replace(record, rate_rpm=limits.rpm, rate_tpm=limits.tpm, rate_streams=limits.streams)


def limits_of(record: ApiKeyRecord) -> KeyLimits:
    """The budgets stored in ``record``."""
    return KeyLimits(rpm=record.rate_rpm, tpm=record.rate_tpm, streams=record.rate_streams)


class ApiKeyStore:
    """API key records in KV, one per key id."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @classmethod
    async def bind(cls, js: JetStreamContext) -> ApiKeyStore:
        """Bind to the provisioned bucket (``BucketNotFoundError`` when ``./cy infra apply`` never ran)."""
        return cls(await js.key_value(names.API_KEYS_BUCKET))

    async def create(self, name: str, scopes: Iterable[Scope | str], limits: KeyLimits | None = None,
                     nats_key: str = "") -> tuple[ApiKeyRecord, str]:
        """Make a new key (with its own rate limits, if given, and the public nkey of its NATS user);
        return its record and the key itself (the only time the key exists)."""
        wanted = sorted({Scope(s).value for s in scopes})
        if not wanted:
            raise ValueError("an API key needs at least one scope")
        key_id, key = new_api_key()
        record = ApiKeyRecord(id=key_id, name=name, hash=hash_key(key), scopes=wanted, created=time.time(),
                              nats_key=nats_key)
        if limits is not None:
            record = _with_limits(record, limits)
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
        ids = await kv_keys(self.kv)
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

    async def set_limits(self, key_id: str, change: Callable[[KeyLimits], KeyLimits]) -> ApiKeyRecord:
        """Replace ``key_id``'s budgets with ``change(current)``; ``UnknownKeyError`` if absent.

        A compare-and-set update, retried when another writer changed the record in between, so a
        concurrent revoke is never undone. Edges see the change within their ``--auth-cache-ttl``.
        """
        for _ in range(_UPDATE_ATTEMPTS):
            try:
                entry = await self.kv.get(key_id)
            except KeyNotFoundError:
                raise UnknownKeyError(key_id) from None
            if not entry.value:
                raise UnknownKeyError(key_id)
            record = _decoder.decode(entry.value)
            updated = _with_limits(record, change(limits_of(record)))
            try:
                await self.kv.update(key_id, _encoder.encode(updated), last=entry.revision)
            except KeyWrongLastSequenceError:
                continue  # 10071: wrong last sequence; someone else wrote the record first
            return updated
        raise RuntimeError(f"API key {key_id}: the record kept changing; try again")
