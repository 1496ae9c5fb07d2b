"""``./cy infra apply``: connect once to NATS and apply ``infra/nats/jetstream.toml``.

Used by ``./cy up`` too. Unlike the services' connection (which retries forever, see
``services.common.bus``), an operator command fails fast with a message saying what to check.
"""

from __future__ import annotations

import asyncio
import sys

import nats
import nats.js.errors
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError, NoServersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import APIError, ServiceUnavailableError

from infra import provision
from schemas import names
from schemas.errors import BusError
from services.cli.errors import CliError
from services.common import bus_permissions, model_registry, published_weights
from services.common.bus import NatsOptions, as_options, connect_kwargs, option_problems


async def connect_once(target: NatsOptions | str, name: str, timeout: float = 5.0, *, nkey: str = "") -> Client:
    """Connect as the operator (``nkey`` or ``target``'s ``nats_nkey``: its seed file), trying each server
    of the list once; ``CliError`` naming the servers and the cause if it fails."""
    options = as_options(target, nkey)
    if problems := option_problems(options):
        raise CliError("; ".join(problems))
    errors: list[Exception] = []

    async def remember(exc: Exception) -> None:
        errors.append(exc)
        if "permissions violation" in str(exc):  # a refused request then only times out: say why
            print(f"cy: NATS refused it: {exc} (is --nats-nkey the operator's seed?)", file=sys.stderr, flush=True)

    try:
        return await nats.connect(**connect_kwargs(options), name=name, connect_timeout=timeout,
                                  allow_reconnect=False, max_reconnect_attempts=1, reconnect_time_wait=0.2,
                                  error_cb=remember, inbox_prefix=names.identity_inbox(bus_permissions.OPERATOR))
    except (NoServersError, OSError, TimeoutError) as exc:
        cause = errors[-1] if errors else exc
        raise CliError(f"cannot connect to NATS at {options.nats_url}: {cause} "
                       "(is ./cy up or nats-server running?)") from None
    except NatsError as exc:  # 'Authorization Violation': no or an unknown nkey
        raise CliError(f"NATS at {options.nats_url} refused the operator: {exc} (give --nats-nkey, the operator "
                       "seed written by ./cy up under <state dir>/nats/nkeys/)") from None


async def wait_for_jetstream(target: NatsOptions | str, timeout: float = 30.0, *, nkey: str = "") -> None:
    """Return once JetStream answers (a new cluster has elected its meta leader); ``CliError`` after ``timeout``."""
    options = as_options(target, nkey)
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        cause: Exception | None = None
        try:
            nc = await connect_once(options, "cy-wait-for-jetstream", timeout=2.0)
        except CliError as exc:
            cause = exc
        else:
            try:
                await nc.jetstream().account_info()
                return
            except (NoRespondersError, ServiceUnavailableError, NatsTimeoutError, APIError) as exc:
                cause = exc  # 10008: JetStream temporarily unavailable (no meta leader yet)
            finally:
                await nc.close()
        if asyncio.get_running_loop().time() >= deadline:
            raise CliError(f"JetStream at {options.nats_url} did not become available within {timeout:g}s: {cause}")
        await asyncio.sleep(0.25)


async def apply_definitions(target: NatsOptions | str, *, update: bool = False, replicas: int | None = None,
                            nkey: str = "") -> list[provision.Action]:
    """Apply every stream, consumer and bucket definition (as the operator: ``nkey``); exit status 2 for a
    conflicting definition.

    ``replicas=None`` keeps what the server holds (new objects get 1): how ``./cy up`` applies.
    """
    url = as_options(target).nats_url
    nc = await connect_once(target, "cy-infra-apply", nkey=nkey)
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


async def register_default_model(target: NatsOptions | str, nkey: str = "", *, publish: bool = True) -> str:
    """Put the shipped default model (with its aliases) into the model registry and, with ``publish``, its
    weights into the object store (so engines on other hosts need neither the wheel nor this disk); what was done."""
    nc = await connect_once(target, "cy-register-default-model", nkey=nkey)
    try:
        js = nc.jetstream()
        kv = await model_registry.bind(js)
        entry = model_registry.default_entry()
        done = []
        if await model_registry.get_entry(kv, entry.id) == entry:
            done.append(f"model registry: {entry.id} already registered")
        else:
            await model_registry.put_entry(kv, entry)
            done.append(f"model registry: registered {entry.id} ({entry.source}, aliases {', '.join(entry.aliases)})")
        if publish:
            try:
                store = await js.object_store(names.ARTIFACTS_STORE)
            except nats.js.errors.BucketNotFoundError:
                raise CliError(f"object store {names.ARTIFACTS_STORE} is missing (run ./cy infra apply)") from None
            done.append(await published_weights.publish_default(store))
        return "\n".join(done)
    except BusError as exc:
        raise CliError(exc.message) from None
    finally:
        await nc.close()
