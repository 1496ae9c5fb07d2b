"""``./cy keys create|list|revoke``: API keys in the ``llm_api_keys`` bucket.

``create`` prints the key once; only its SHA-256 is stored, so a lost key cannot be shown
again (revoke it and create another). ``list`` never prints a key or a hash.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import BucketNotFoundError, ServiceUnavailableError

from schemas import names
from schemas.auth import ApiKeyRecord
from services.cli.errors import CliError
from services.cli.infra import connect_once
from services.common.api_key_store import ApiKeyStore, UnknownKeyError

T = TypeVar("T")
KEY_ID = re.compile(r"^[0-9a-f]{12}$")


async def _with_store(url: str, action: Callable[[ApiKeyStore], Awaitable[T]]) -> T:
    """Connect, bind the bucket, run ``action``, close; bus failures become ``CliError``s."""
    nc = await connect_once(url, "cy-keys")
    try:
        return await action(await ApiKeyStore.bind(nc.jetstream()))
    except BucketNotFoundError:
        raise CliError(f"KV bucket {names.API_KEYS_BUCKET} does not exist at {url}: run ./cy infra apply") from None
    except (NoRespondersError, ServiceUnavailableError, NatsTimeoutError):
        raise CliError(f"JetStream does not answer at {url}: is the server started with JetStream (-js)?") from None
    finally:
        await nc.close()


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else "-"


def format_records(records: list[ApiKeyRecord]) -> str:
    """A table of id, name, scopes, created and revoked (never the key or its hash)."""
    rows = [("ID", "NAME", "SCOPES", "CREATED", "REVOKED")]
    rows += [(r.id, r.name, ",".join(r.scopes), _when(r.created), _when(r.revoked_at) if r.revoked else "no")
             for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def create(url: str, name: str, scopes: list[str]) -> int:
    """Create a key and print it once, with how to use it."""
    record, key = asyncio.run(_with_store(url, lambda store: store.create(name, scopes)))
    print(key)
    print(f"\ncreated key {record.id} ({record.name}; scopes: {', '.join(record.scopes)}). "
          "This is the only time the key is shown: store it now.\n"
          "Send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'; "
          f"revoke it with ./cy keys revoke {record.id}")
    return 0


def list_keys(url: str) -> int:
    """Print every key's id, name, scopes, creation and revocation time."""
    records = asyncio.run(_with_store(url, lambda store: store.records()))
    print(format_records(records) if records else "no API keys (create one with ./cy keys create)")
    return 0


def revoke(url: str, key_id: str, cache_ttl: float = 5.0) -> int:
    """Revoke a key; say how soon running edges stop accepting it."""
    if not KEY_ID.match(key_id):
        raise CliError(f"{key_id!r} is not a key id (12 hex digits, as ./cy keys list shows)")
    try:
        record = asyncio.run(_with_store(url, lambda store: store.revoke(key_id)))
    except UnknownKeyError:
        raise CliError(f"no API key with id {key_id!r} (see ./cy keys list)") from None
    print(f"revoked key {record.id} ({record.name}); edges refuse it within their --auth-cache-ttl "
          f"(default {cache_ttl:g}s)")
    return 0
