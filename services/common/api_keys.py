"""API keys as strings: making one, finding its id, hashing it, checking it (no I/O here).

A key is ``cy-<id>.<secret>``: ``<id>`` (12 hex digits) is the KV key of its record, so a
lookup never scans; ``<secret>`` is 32 random bytes (``secrets.token_urlsafe``). Only the
SHA-256 of the whole key is stored, and it is compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

KEY_PREFIX = "cy-"
_KEY_RE = re.compile(r"^cy-([0-9a-f]{12})\.[A-Za-z0-9_-]{20,128}\Z")


def new_api_key() -> tuple[str, str]:
    """A fresh ``(key_id, key)``."""
    key_id = secrets.token_hex(6)
    return key_id, f"{KEY_PREFIX}{key_id}.{secrets.token_urlsafe(32)}"


def key_id_of(key: str) -> str | None:
    """The id embedded in ``key``, or ``None`` when ``key`` is not shaped like a CY-LLM key."""
    match = _KEY_RE.match(key)
    return match.group(1) if match else None


def hash_key(key: str) -> str:
    """Hex SHA-256 of the key: what is stored instead of the key."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_matches(key: str, stored_hash: str) -> bool:
    """Whether ``key`` hashes to ``stored_hash``, compared in constant time."""
    return hmac.compare_digest(hash_key(key).encode(), stored_hash.encode())
