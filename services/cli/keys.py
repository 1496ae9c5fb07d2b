"""``./cy keys create|list|revoke|limits``: API keys in the ``llm_api_keys`` bucket.

``create`` prints the key once; only its SHA-256 is stored, so a lost key cannot be shown
again (revoke it and create another). ``list`` never prints a key or a hash. A key may carry
its own rate limits (``--rpm``, ``--tpm``, ``--max-streams``) overriding the edge's ``--rate-*``
defaults; ``limits`` changes them, and edges apply a change within their ``--auth-cache-ttl``.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import BucketNotFoundError, ServiceUnavailableError

from schemas import names
from schemas.auth import ApiKeyRecord, Scope
from services.cli import nats_auth
from services.cli.errors import CliError
from services.cli.infra import connect_once
from services.cli.nats_auth import add_operator_nats_arguments
from services.common import bus_auth
from services.common.bus import NatsOptions, as_options, options_from_args
from services.common.api_key_store import ApiKeyStore, KeyLimits, UnknownKeyError, limits_of
from services.common.model_store import default_state_dir

T = TypeVar("T")
KEY_ID = re.compile(r"^[0-9a-f]{12}$")
# ``--rpm default`` on ``limits``: back to the edge's --rate-* default.
DEFAULT = "default"
# (option, KeyLimits field, what it limits)
_LIMIT_OPTIONS = (("--rpm", "rpm", "requests per minute"), ("--tpm", "tpm", "tokens (prompt + completion) per minute"),
                  ("--max-streams", "streams", "concurrent streams (SSE and WebSocket requests)"))


async def _with_store(target: NatsOptions | str, action: Callable[[ApiKeyStore], Awaitable[T]], nkey: str = "") -> T:
    """Connect (as the operator: ``nkey``), bind the bucket, run ``action``, close; bus failures become
    ``CliError``s."""
    url = as_options(target).nats_url
    nc = await connect_once(target, "cy-keys", nkey=nkey)
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


def _limit(value: int | None) -> str:
    return DEFAULT if value is None else ("unlimited" if value == 0 else str(value))


def format_limits(limits: KeyLimits) -> str:
    """``rpm=60 tpm=default max-streams=unlimited``."""
    return f"rpm={_limit(limits.rpm)} tpm={_limit(limits.tpm)} max-streams={_limit(limits.streams)}"


def format_records(records: list[ApiKeyRecord]) -> str:
    """A table of id, name, scopes, rate limits, created and revoked (never the key or its hash)."""
    rows = [("ID", "NAME", "SCOPES", "RPM", "TPM", "STREAMS", "CREATED", "REVOKED")]
    rows += [(r.id, r.name, ",".join(r.scopes), _limit(r.rate_rpm), _limit(r.rate_tpm), _limit(r.rate_streams),
              _when(r.created), _when(r.revoked_at) if r.revoked else "no")
             for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def create(url: NatsOptions | str, name: str, scopes: list[str], limits: KeyLimits | None = None, nkey: str = "",
           nats_state_dir: Path | None = None) -> int:
    """Create a key and print it once, with how to use it; with ``nats_state_dir``, also the key's own
    NATS user (its seed printed once) added to that ``./cy up``'s bus."""
    seed = bus_auth.new_seed() if nats_state_dir is not None else b""
    public = bus_auth.public_key_of(seed) if seed else ""

    async def action(store: ApiKeyStore) -> tuple[ApiKeyRecord, str, str]:
        record, key = await store.create(name, scopes, limits, nats_key=public)
        refreshed = nats_auth.refresh_key_users(nats_state_dir, await store.records()) if seed else ""
        return record, key, refreshed

    record, key, refreshed = asyncio.run(_with_store(url, action, nkey))
    print(key)
    if seed:
        print(f"\nNATS seed of this key (shown once; connect with nats.connect(..., nkeys_seed_str=SEED, "
              f"inbox_prefix='{names.identity_inbox(record.id)}'); submit to "
              f"{names.infer_keyed(record.id, 'normal')} (or .high, .low), held to this key's limits):"
              f"\n{seed.decode()}\n{refreshed}")
    print(f"\ncreated key {record.id} ({record.name}; scopes: {', '.join(record.scopes)}; "
          f"{format_limits(limits_of(record))}). "
          "This is the only time the key is shown: store it now.\n"
          "Send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'; "
          f"revoke it with ./cy keys revoke {record.id}")
    return 0


def list_keys(url: NatsOptions | str, nkey: str = "") -> int:
    """Print every key's id, name, scopes, creation and revocation time."""
    records = asyncio.run(_with_store(url, lambda store: store.records(), nkey))
    print(format_records(records) if records else "no API keys (create one with ./cy keys create)")
    return 0


def _check_id(key_id: str) -> None:
    if not KEY_ID.match(key_id):
        raise CliError(f"{key_id!r} is not a key id (12 hex digits, as ./cy keys list shows)")


def revoke(url: NatsOptions | str, key_id: str, cache_ttl: float = 5.0, nkey: str = "",
           state_dir: Path | None = None) -> int:
    """Revoke a key; say how soon running edges stop accepting it (and remove its NATS user, if it has
    one, from the bus of ``./cy up`` in ``state_dir``)."""
    state_dir = (state_dir or default_state_dir()).resolve()
    _check_id(key_id)
    async def action(store: ApiKeyStore) -> tuple[ApiKeyRecord, str]:
        record = await store.revoke(key_id)
        refreshed = nats_auth.refresh_key_users(state_dir, await store.records()) if record.nats_key else ""
        return record, refreshed

    try:
        record, refreshed = asyncio.run(_with_store(url, action, nkey))
    except UnknownKeyError:
        raise CliError(f"no API key with id {key_id!r} (see ./cy keys list)") from None
    print(f"revoked key {record.id} ({record.name}); edges refuse it within their --auth-cache-ttl "
          f"(default {cache_ttl:g}s)" + (f"; its NATS user: {refreshed}" if refreshed else ""))
    return 0


def set_limits(url: NatsOptions | str, key_id: str, changes: dict[str, int | None], cache_ttl: float = 5.0,
               nkey: str = "") -> int:
    """Change a key's rate limits (``None``: back to the edge default) and print them; with no
    changes, only print them."""
    _check_id(key_id)

    async def action(store: ApiKeyStore) -> ApiKeyRecord:
        if not changes:
            record = await store.get(key_id)
            if record is None:
                raise UnknownKeyError(key_id)
            return record
        return await store.set_limits(key_id, lambda current: KeyLimits(**{**vars(current), **changes}))

    try:
        record = asyncio.run(_with_store(url, action, nkey))
    except UnknownKeyError:
        raise CliError(f"no API key with id {key_id!r} (see ./cy keys list)") from None
    print(f"key {record.id} ({record.name}): {format_limits(limits_of(record))}")
    if changes:
        print(f"edges apply the change within their --auth-cache-ttl (default {cache_ttl:g}s)")
    return 0


def _count(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative (0 means unlimited)")
    return number


def _count_or_default(value: str) -> int | None:
    return None if value == DEFAULT else _count(value)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``./cy keys ...`` and its actions."""
    actions = sub.add_parser("keys", help="API keys of the edge (--auth keys)").add_subparsers(
        dest="keys_command", required=True, metavar="ACTION")
    p = actions.add_parser("create", help="create an API key and print it (once)",
                           description="Create an API key with the given scopes and print it. Only its SHA-256 "
                           "is stored: the key cannot be shown again. Rate limits not given are the edge's "
                           "--rate-* defaults; 0 means unlimited.")
    p.add_argument("--name", required=True, help="who or what the key is for")
    p.add_argument("--nats", action="store_true",
                   help="also a NATS user for this key (a NATS-native producer: submit and cancel if it has the "
                        "inference scope, only its own inbox _INBOX.<key id>); its seed is printed once and the "
                        "running ./cy up of --state-dir reloads its bus users")
    p.add_argument("--scope", action="append", required=True, choices=[s.value for s in Scope],
                   help="a scope to grant (repeatable; admin implies the others)")
    for option, field, what in _LIMIT_OPTIONS:
        p.add_argument(option, dest=field, type=_count, default=None, metavar="N",
                       help=f"{what} for this key (default: the edge's; 0: unlimited)")
    lst = actions.add_parser("list", help="list keys: id, name, scopes, rate limits, created, revoked (never the key)")
    rev = actions.add_parser("revoke", help="revoke a key by id",
                             description="Revoke a key; edges refuse it within their --auth-cache-ttl (5s default).")
    rev.add_argument("key_id", metavar="ID", help="the key id shown by ./cy keys list")
    lim = actions.add_parser("limits", help="show or change a key's rate limits",
                             description="Show a key's rate limits, or change the ones given: N (0 = unlimited) or "
                             "'default' (the edge's --rate-* value). Edges apply a change within their "
                             "--auth-cache-ttl (5s default).")
    lim.add_argument("key_id", metavar="ID", help="the key id shown by ./cy keys list")
    for option, field, what in _LIMIT_OPTIONS:
        lim.add_argument(option, dest=field, type=_count_or_default, default=argparse.SUPPRESS, metavar="N|default",
                         help=what)
    for p in (p, lst, rev, lim):
        add_operator_nats_arguments(p)
        p.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                       help="the ./cy up whose bus users a key's NATS user joins or leaves (create --nats, revoke; "
                            "default: $CY_STATE_DIR or .cy in the repo)")


def run(args: argparse.Namespace) -> int:
    """Run the parsed ``./cy keys`` action."""
    match args.keys_command:
        case "create":
            limits = KeyLimits(rpm=args.rpm, tpm=args.tpm, streams=args.streams)
            state_dir = (args.state_dir or default_state_dir()).resolve()
            return create(options_from_args(args), args.name, args.scope, limits,
                          nats_state_dir=state_dir if args.nats else None)
        case "list":
            return list_keys(options_from_args(args))
        case "revoke":
            return revoke(options_from_args(args), args.key_id,
                          state_dir=(args.state_dir or default_state_dir()).resolve())
        case "limits":
            changes = {field: getattr(args, field) for _, field, _ in _LIMIT_OPTIONS if hasattr(args, field)}
            return set_limits(options_from_args(args), args.key_id, changes)
    raise AssertionError(f"unhandled keys command {args.keys_command!r}")
