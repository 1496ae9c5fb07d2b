"""The small operator commands: ``down``, ``infra apply``, ``model install``, ``run`` and ``test``.

``up`` lives in its own module (``services.cli.up``); argument parsing in ``services.cli.main``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from services.cli import nats_auth, pidfile, sites
from services.cli.errors import CliError
from services.cli.infra import apply_definitions, register_default_model
from services.common import bus_auth
from services.common.bus import NatsOptions
from services.common.model_store import DEFAULT_MODEL_ID, ensure_default_model

REPO = Path(__file__).resolve().parents[2]


def down(state_dir: Path, timeout: float) -> int:
    """Stop the ``./cy up`` recorded in ``state_dir`` and wait until it has exited."""
    print(pidfile.stop_launcher(state_dir.resolve(), timeout))
    return 0


def infra_apply(nats: NatsOptions | str, update: bool, replicas: int | None, nkey: str = "") -> int:
    """Apply the JetStream definitions, register the default model and publish its weights; print what was done."""
    if replicas is not None and replicas < 1:
        raise CliError("--replicas must be at least 1")
    async def apply() -> tuple[list, str]:
        actions = await apply_definitions(nats, update=update, replicas=replicas, nkey=nkey)
        # Engines and trainers on any host find the default model in the registry and its weights in the store.
        return actions, await register_default_model(nats, nkey=nkey)

    actions, registered = asyncio.run(apply())
    for action in actions:
        print(action)
    print(registered, file=sys.stderr, flush=True)  # stdout stays one line per JetStream object
    return 0


def run_service(service: str, argv: list[str]) -> int:
    """Become ``python -m services.<service> argv...`` (its exit status and signals are the service's own)."""
    # services.* resolves to this checkout from any working directory (relative paths stay the caller's).
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    os.execve(sys.executable, [sys.executable, "-m", f"services.{service}", *argv], {**os.environ, "PYTHONPATH": path})
    return 0  # unreachable: execv does not return


def nats_permissions(state_dir: Path, workers: list[str], fmt: str) -> int:
    """Print every bus identity's permissions (``conf``: the server's authorization block for the
    seeds of ``state_dir``, created if missing)."""
    try:
        identities = nats_auth.prepare("nkeys" if fmt == "conf" else "none", state_dir.resolve(), workers)
    except ValueError as exc:  # a worker id that is no subject token
        raise CliError(str(exc)) from None
    if fmt == "table":
        print(nats_auth.format_permissions(identities.permissions))
        return 0
    users = {bus_auth.public_key(identities.seeds[name]): perms for name, perms in identities.permissions.items()}
    print(bus_auth.authorization_block(users), end="")
    return 0


def nats_site(state_dir: Path, site: str, workers: list[str], hub: str, hub_domain: str, listen: str) -> int:
    """Write a site's leaf node config; print where, and the hub's user for the site."""
    try:
        path, hub_users = sites.write_site(state_dir.resolve(), site, workers,
                                           [u.strip() for u in hub.split(",") if u.strip()], hub_domain, listen)
    except ValueError as exc:  # a site or worker name that is no subject token
        raise CliError(str(exc)) from None
    print(sites.describe(path, hub_users, hub_domain), end="")
    return 0


def nats_rotate(state_dir: Path, identity: str) -> int:
    """Give ``identity`` a new seed (and a running server the new config); print what was done."""
    print(nats_auth.rotate(state_dir.resolve(), identity))
    return 0


def model_install(state_dir: Path) -> int:
    """Make sure the default model is converted into the store; print its directory."""
    print(ensure_model(state_dir))
    return 0


def run_tests(pytest_args: list[str]) -> int:
    """Convert the default model once (so no test pays for it), then become ``python -m pytest``."""
    from services.common.model_store import default_state_dir

    path = ensure_model(default_state_dir())
    print(f"cy: default model ready at {path}", file=sys.stderr, flush=True)
    args = pytest_args[1:] if pytest_args[:1] == ["--"] else pytest_args
    if not args:
        os.chdir(REPO)  # the whole suite: pyproject.toml's testpaths, wherever we were called from
    # exec, not a child: pytest's exit status and Ctrl-C behave as if it had been run directly.
    os.execv(sys.executable, [sys.executable, "-m", "pytest", *args])
    return 0  # unreachable: execv does not return


def ensure_model(state_dir: Path) -> Path:
    """The default model's directory, converted on first use; ``CliError`` if its package is missing."""
    try:
        return ensure_default_model(state_dir)
    except FileNotFoundError as exc:
        raise CliError(f"{DEFAULT_MODEL_ID}: {exc}") from None
