"""Auth contracts: the scopes a credential can grant and the stored form of an API key.

An API key itself never crosses the bus or reaches storage: the ``llm_api_keys`` bucket holds
one ``ApiKeyRecord`` per key id, with only the SHA-256 of the key.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import msgspec


class Scope(enum.StrEnum):
    """What a credential may do. ``admin`` implies every other scope."""

    INFERENCE = "inference"
    TRAINING = "training"
    ADMIN = "admin"


def grants(granted: Iterable[str], required: Scope | str) -> bool:
    """True when the ``granted`` scopes allow an action that needs ``required`` (admin allows all)."""
    have = set(granted)
    return Scope.ADMIN in have or str(required) in have


# omit_defaults: a field added later (nats_key) is not written while unset, so a record still
# encodes to the bytes of the release that had no such field.
class ApiKeyRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One API key as stored in KV ``llm_api_keys`` under its ``id``; the key is not in it."""

    id: str
    name: str
    # Hex SHA-256 of the whole key string (``cy-<id>.<secret>``).
    hash: str
    scopes: list[str]
    created: float
    revoked: bool = False
    revoked_at: float | None = None
    # Per-key rate limits overriding the edge's --rate-* defaults: None = the default, 0 = unlimited.
    rate_rpm: int | None = None
    rate_tpm: int | None = None
    rate_streams: int | None = None
    # Public nkey (``U...``) of the key's NATS-native producer user (``./cy keys create --nats``); empty: none.
    nats_key: str = ""
