"""The bus identities of ``./cy up`` and ``./cy nats permissions``.

``--nats-auth nkeys`` (the default): every service connects as its own nkey user, whose seed
``./cy up`` creates once under ``<state dir>/nats/nkeys/`` and whose permissions come from
``services.common.bus_permissions``. ``--nats-auth none`` is the unauthenticated development
bus, refused unless every NATS address is on loopback (as the edge refuses ``--auth none``).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psutil

from infra import provision
from schemas.auth import ApiKeyRecord
from services.cli.errors import CliError
from services.cli.infra import connect_once
from services.common import bus, bus_auth, bus_permissions
from services.common.api_key_store import ApiKeyStore
from services.common.bus import NatsOptions
from services.common.bus_permissions import Permissions
from services.common.hosts import is_loopback
from services.common.model_store import default_state_dir
from services.common.natsserver import (EFFECTIVE_CONFIG, config_with_encryption, config_with_sync, is_encrypted,
                                        node_config_copy, node_part)

AUTH_MODES = ("nkeys", "none")
RELOADED = "Reloaded server configuration"  # nats-server's log line once a reload is in force
# The embedded server's config without users (./cy up adds them).
SERVER_CONFIG = Path(provision.__file__).parent / "nats" / "server.conf"
# Where ./cy up --nats-cluster keeps its nodes' stores (n1, n2, ...), beside the single node's "nats".
CLUSTER_DIR = "nats-cluster"
_SYNC_ALWAYS = re.compile(r"^\s*sync_interval:\s*always\s*$", re.MULTILINE)


@dataclass(frozen=True)
class BusIdentities:
    """The seed file of every identity (empty when the bus is unauthenticated)."""

    seeds: dict[str, Path]
    permissions: dict[str, Permissions]

    @property
    def enabled(self) -> bool:
        """Whether services authenticate (``--nats-auth nkeys``)."""
        return bool(self.seeds)

    def nkey(self, identity: str) -> str:
        """The seed file of ``identity`` as a flag value; empty on an unauthenticated bus."""
        return str(self.seeds[identity]) if self.enabled else ""


def check_unauthenticated(mode: str, nats_url: str | None) -> None:
    """Refuse ``--nats-auth none`` against any server that is not on loopback."""
    if mode != "none" or nats_url is None:
        return  # the embedded server always binds 127.0.0.1
    for url in (u.strip() for u in nats_url.split(",") if u.strip()):
        host = urlsplit(url if "://" in url else f"nats://{url}").hostname or ""
        if not is_loopback(host):
            raise CliError(f"refusing an unauthenticated bus at {url}: --nats-auth none is for a development "
                           "server on loopback only; use --nats-auth nkeys (the default)")


def prepare(mode: str, state_dir: Path, workers: list[str]) -> BusIdentities:
    """The identities of a ``./cy up`` with engine ``workers``: seeds created on first run, kept after."""
    permissions = bus_permissions.identities(workers)
    if mode == "none":
        return BusIdentities({}, permissions)
    seeds = bus_auth.ensure_seeds(bus_auth.nkeys_dir(state_dir), permissions.values())
    return BusIdentities(seeds, permissions)


def write_server_config(identities: BusIdentities, base: Path, state_dir: Path) -> Path:
    """The embedded server's config: ``base`` plus one user per identity (0600, in the state dir)."""
    target = state_dir / "nats" / bus_auth.AUTH_CONFIG
    return bus_auth.write_server_config(base, target, identities.seeds, identities.permissions)


def rotate(state_dir: Path, identity: str, base: Path = SERVER_CONFIG) -> str:
    """Give ``identity`` a new seed and rewrite the server config; refused while ``./cy up`` runs.

    A running service cannot switch seeds: nats-py keeps the public key of its first connect
    and would sign every reconnect with the new seed under the old key, and be refused forever.
    What was done, as text.
    """
    if running := _running_nodes(state_dir):
        raise CliError(f"nats-server of {state_dir} is running (pid {', '.join(str(n.pid) for n in running)}): "
                       "stop the platform first (./cy down), "
                       "rotate, then ./cy up; a running service cannot switch to a new seed")
    directory = bus_auth.nkeys_dir(state_dir)
    present = bus_auth.identities_in(directory)
    if identity not in present:
        raise CliError(f"no seed for {identity!r} in {directory} (there are: {', '.join(present) or 'none'})")
    bus_auth.rotate_seed(directory, identity)
    config = _rewrite(state_dir, base, {})
    return f"new seed for {identity} in {directory}; {config} rewritten: the old key is refused from the next ./cy up"


def _rewrite(state_dir: Path, base: Path, extra: dict[str, Permissions]) -> Path:
    """The state dir's server config from the seeds it holds, plus ``extra`` users (public key -> permissions)."""
    directory = bus_auth.nkeys_dir(state_dir)
    present = bus_auth.identities_in(directory)
    workers = [name.split(".", 1)[1] for name in present if name.startswith(f"{bus_permissions.ENGINE}.")]
    permissions = bus_permissions.identities(workers)
    seeds = {name: bus_auth.seed_path(directory, name) for name in present if name in permissions}
    return bus_auth.write_server_config(base, state_dir / "nats" / bus_auth.AUTH_CONFIG, seeds, permissions, extra)


def key_users(records: list[ApiKeyRecord]) -> dict[str, Permissions]:
    """The NATS users of the API keys that have one and are not revoked, by public key."""
    return {r.nats_key: bus_permissions.key_producer(r.id, r.scopes) for r in records if r.nats_key and not r.revoked}


def refresh_key_users(state_dir: Path, records: list[ApiKeyRecord], base: Path = SERVER_CONFIG) -> str:
    """Rewrite the state dir's server config with these keys' NATS users and reload its running server.

    A reload adds new users at once and closes the connections of removed (revoked) ones.
    """
    if not bus_auth.identities_in(bus_auth.nkeys_dir(state_dir)):
        return (f"{state_dir} has no bus users (not a ./cy up state dir with --nats-auth nkeys): add the key's "
                "user to your server yourself (./cy nats permissions --format conf)")
    config = _rewrite(state_dir, base, key_users(records))
    running = _running_nodes(state_dir)
    if not running:
        return f"{config} rewritten: the next ./cy up knows the API keys' NATS users"
    for node in running:  # every node of a cluster checks its own clients' users
        _refresh_copy(node, config)
        _reload(node.pid, node.log)
    pids = ", ".join(str(n.pid) for n in running)
    return f"{config} rewritten and nats-server (pid {pids}) reloaded: API keys' NATS users are current"


def _reload(pid: int, log: Path, timeout: float = 10.0) -> None:
    """SIGHUP the server and return once its log says the new config is in force (a connect before
    that would still meet the old users)."""
    def reloads() -> int:
        return log.read_text(errors="replace").count(RELOADED) if log.exists() else 0

    before = reloads()
    os.kill(pid, signal.SIGHUP)  # nats-server reloads its config on SIGHUP
    deadline = time.monotonic() + timeout
    while reloads() == before:
        if time.monotonic() > deadline:
            raise CliError(f"nats-server (pid {pid}) did not report a config reload within {timeout:g}s; see {log}")
        time.sleep(0.05)


async def sync_key_users(url: NatsOptions | str, operator_nkey: str, state_dir: Path) -> str:
    """At ``./cy up``: give the embedded server the NATS users of the API keys that have one."""
    nc = await connect_once(url, "cy-key-users", nkey=operator_nkey)
    try:
        records = await (await ApiKeyStore.bind(nc.jetstream())).records()
    finally:
        await nc.close()
    if not key_users(records):
        return "bus users: the services (no API key has a NATS user)"
    return f"bus users: {len(key_users(records))} API key(s) with a NATS user; " + refresh_key_users(state_dir, records)


@dataclass(frozen=True)
class RunningNode:
    """An embedded nats-server of a state dir that still runs: its pid, store directory and log."""

    pid: int
    store_dir: Path
    log: Path


def _running_nodes(state_dir: Path) -> list[RunningNode]:
    """The embedded nats-server of ``state_dir`` (or every node of its ``--nats-cluster``) still running,
    from their ports files."""
    stores = [state_dir / "nats", *sorted(p for p in (state_dir / CLUSTER_DIR).glob("n*") if p.is_dir())]
    nodes = []
    for store in stores:
        log = state_dir / "logs" / ("nats.log" if store.parent == state_dir else f"nats-{store.name}.log")
        for ports in (store / "ports").glob("*.ports"):
            pid = int(ports.stem.rsplit("_", 1)[1])
            try:
                if "nats-server" in psutil.Process(pid).name():  # a stale file's pid may be someone else's now
                    nodes.append(RunningNode(pid, store, log))
            except psutil.NoSuchProcess:
                continue
    return nodes


def _refresh_copy(node: RunningNode, config: Path) -> None:
    """A node started with ``--fsync`` or as a cluster node reads a copy of ``config`` in its store
    (``NatsServer``): write the new users into that copy too, its fsync policy, encryption and own
    settings kept."""
    copy = node.store_dir / EFFECTIVE_CONFIG
    if copy.exists():
        text = copy.read_text()
        sync = "always" if _SYNC_ALWAYS.search(text) else "interval"
        shared = config_with_sync(config.read_text(), sync)
        if is_encrypted(text):  # a reload cannot change JetStream's cipher: keep it
            shared = config_with_encryption(shared)
        copy.write_text(node_config_copy(shared, node_part(text)))


def default_operator_nkey() -> str:
    """``$CY_NATS_NKEY``, else the operator seed of the default state dir's ``./cy up`` (if there is one)."""
    if os.environ.get(bus.NKEY_ENV):
        return os.environ[bus.NKEY_ENV]
    seed = bus_auth.seed_path(bus_auth.nkeys_dir(default_state_dir()), bus_permissions.OPERATOR)
    return str(seed) if seed.exists() else ""


def add_operator_nats_arguments(parser: argparse.ArgumentParser, *, url_from_env: bool = True) -> None:
    """The ``--nats-*`` options of an operator command (``./cy keys``, ``./cy infra``, ``./cy backup``):
    ``--nats-nkey`` defaults to the operator's seed."""
    bus.add_nats_arguments(parser, url_from_env=url_from_env, nkey_default=default_operator_nkey(),
                           nkey_help="nkey seed of the operator's NATS user (default: $CY_NATS_NKEY, else "
                                     "<state dir>/nats/nkeys/operator.nk written by ./cy up)")


def format_permissions(permissions: dict[str, Permissions]) -> str:
    """Every identity with what it may publish and subscribe to, one subject a line."""
    blocks = []
    for perms in permissions.values():
        lines = [f"{perms.identity}  ({perms.description}; inbox {perms.inbox})"]
        lines += [f"  publish    {s}" for s in perms.publish]
        if perms.allow_responses:
            lines.append("  publish    (replies to requests it received: allow_responses)")
        lines += [f"  subscribe  {s}" for s in perms.subscribe]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
