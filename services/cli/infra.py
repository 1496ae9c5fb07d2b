"""``./cy infra apply``: connect once to NATS and apply ``infra/nats/jetstream.toml``.

Used by ``./cy up`` too. Unlike the services' connection (which retries forever, see
``services.common.bus``), an operator command fails fast with a message saying what to check.
"""

from __future__ import annotations

import os
import sys

import nats
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError, NoServersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import APIError, ServiceUnavailableError

from infra import provision
from schemas import names
from schemas.errors import BusError
from services.cli.errors import CliError
from services.common import bus_permissions, model_registry

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


def default_nats_url() -> str:
    """``$CY_NATS_URL`` or the local default server."""
    return os.environ.get("CY_NATS_URL", DEFAULT_NATS_URL)


def server_list(url: str) -> list[str]:
    """A comma-separated URL list (the cluster's nodes) as nats-py wants it."""
    return [u.strip() for u in url.split(",") if u.strip()]


async def connect_once(url: str, name: str, timeout: float = 5.0, *, nkey: str = "") -> Client:
    """Connect as the operator (``nkey``: its seed file) without retrying forever; ``CliError`` naming
    the URL and the cause if it fails."""
    errors: list[Exception] = []

    async def remember(exc: Exception) -> None:
        errors.append(exc)
        if "permissions violation" in str(exc):  # a refused request then only times out: say why
            print(f"cy: NATS refused it: {exc} (is --nats-nkey the operator's seed?)", file=sys.stderr, flush=True)

    auth = {"nkeys_seed": nkey} if nkey else {}
    try:
        return await nats.connect(server_list(url), name=name, connect_timeout=timeout, allow_reconnect=False,
                                  max_reconnect_attempts=1, reconnect_time_wait=0.2, error_cb=remember,
                                  inbox_prefix=names.identity_inbox(bus_permissions.OPERATOR), **auth)
    except (NoServersError, OSError, TimeoutError) as exc:
        cause = errors[-1] if errors else exc
        raise CliError(f"cannot connect to NATS at {url}: {cause} (is ./cy up or nats-server running?)") from None
    except NatsError as exc:  # 'Authorization Violation': no or an unknown nkey
        raise CliError(f"NATS at {url} refused the operator: {exc} (give --nats-nkey, the operator seed "
                       "written by ./cy up under <state dir>/nats/nkeys/)") from None


async def apply_definitions(url: str, *, update: bool = False, replicas: int = 1,
                            nkey: str = "") -> list[provision.Action]:
    """Apply every stream, consumer and bucket definition; exit status 2 for a conflicting definition."""
    nc = await connect_once(url, "cy-infra-apply", nkey=nkey)
    try:
        return await provision.apply(nc.jetstream(), update=update, replicas=replicas)
    except provision.ProvisionError as exc:
        raise CliError(str(exc), exit_code=2) from None
    except (NoRespondersError, ServiceUnavailableError, NatsTimeoutError):
        raise CliError(f"JetStream does not answer at {url}: is the server started with JetStream (-js)?") from None
    except APIError as exc:  # e.g. 10074: more replicas asked for than the cluster has servers
        raise CliError(f"the NATS server refused a definition: {exc.description or exc}") from None
    finally:
        await nc.close()


async def register_default_model(url: str, nkey: str = "") -> str:
    """Put the shipped default model (with its aliases) into the model registry; what was done."""
    nc = await connect_once(url, "cy-register-default-model", nkey=nkey)
    try:
        kv = await model_registry.bind(nc.jetstream())
        entry = model_registry.default_entry()
        if await model_registry.get_entry(kv, entry.id) == entry:
            return f"model registry: {entry.id} already registered"
        await model_registry.put_entry(kv, entry)
        return f"model registry: registered {entry.id} ({entry.source}, aliases {', '.join(entry.aliases)})"
    except BusError as exc:
        raise CliError(exc.message) from None
    finally:
        await nc.close()
