"""Connecting to NATS the same way in every service and operator command, and what "the bus is down" means.

One place for what a NATS address is: a comma-separated server list (the nodes of a cluster;
any one of them is enough to start, the client learns the others and fails over between them),
plus credentials and TLS named as the ``nats`` CLI names them. ``add_nats_arguments`` gives a
parser ``--nats-url``, ``--nats-creds``, ``--nats-nkey`` (this service's nkey user),
``--nats-tls-ca``, ``--nats-tls-cert``, ``--nats-tls-key`` with environment defaults; every
service config inherits ``NatsOptions`` so the parsed values land in its strict config struct
under the same names; ``connect`` turns them into a client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Callable, Mapping

import msgspec
import nats
import nats.errors
from nats.aio.client import Client

log = logging.getLogger(__name__)

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
_SCHEMES = ("nats", "tls", "ws", "wss")
# Flag -> environment variables read for its default, ours first, then the nats CLI's own.
_ENV = {
    "nats_url": ("CY_NATS_URL", "NATS_URL"),
    "nats_creds": ("CY_NATS_CREDS", "NATS_CREDS"),
    "nats_nkey": ("CY_NATS_NKEY",),
    "nats_tls_ca": ("CY_NATS_TLS_CA", "NATS_CA"),
    "nats_tls_cert": ("CY_NATS_TLS_CERT", "NATS_CERT"),
    "nats_tls_key": ("CY_NATS_TLS_KEY", "NATS_KEY"),
}
# Connection states in which nothing reaches the server now (closed, draining, reconnecting, a full
# outbound buffer, a stale connection). Every service catches exactly these as "the bus is down";
# what a caller adds to them (a timeout, no responders) is its own decision.
BUS_DOWN: tuple[type[Exception], ...] = (
    nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError, nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError, nats.errors.StaleConnectionError)

# Env fallback of --nats-nkey: the seed file of this process's NATS user (./cy up sets the flag).
NKEY_ENV = "CY_NATS_NKEY"


class NatsOptions(msgspec.Struct, kw_only=True):
    """How to reach NATS: the server list as given (``a,b,c``), credentials and TLS files ("" = none).

    Service config structs inherit it, so ``--nats-*`` flags decode into them strictly.
    """

    nats_url: str = DEFAULT_NATS_URL
    nats_creds: str = ""
    nats_nkey: str = ""
    nats_tls_ca: str = ""
    nats_tls_cert: str = ""
    nats_tls_key: str = ""

    @property
    def servers(self) -> list[str]:
        """The server URLs, as nats-py takes them (a list, never one comma string)."""
        return server_list(self.nats_url)

    @property
    def uses_tls(self) -> bool:
        """TLS was asked for by a file or a ``tls://`` URL."""
        return bool(self.nats_tls_ca or self.nats_tls_cert) or any(s.startswith(("tls://", "wss://"))
                                                                     for s in self.servers)


def server_list(text: str) -> list[str]:
    """``"a:4222, nats://b:4222"`` -> ``["nats://a:4222", "nats://b:4222"]``; ``ValueError`` if malformed."""
    servers = []
    for part in text.split(","):
        url = part.strip()
        if not url:
            continue
        if "://" not in url:
            url = f"nats://{url}"
        scheme, _, rest = url.partition("://")
        if scheme not in _SCHEMES or not rest or "/" in rest.rstrip("/"):
            raise ValueError(f"{part.strip()!r} is not a NATS server URL (nats://host:port, tls://host:port)")
        servers.append(url)
    if not servers:
        raise ValueError("no NATS server given")
    return servers


def _url_list(text: str) -> str:
    """argparse type of ``--nats-url``: validated and normalised, kept as one comma-separated string."""
    try:
        return ",".join(server_list(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def env_default(field: str, environ: Mapping[str, str] | None = None) -> str:
    """The environment's value for a ``NatsOptions`` field (``CY_*`` first, then the nats CLI's name)."""
    env = os.environ if environ is None else environ
    for var in _ENV[field]:
        if env.get(var):
            return env[var]
    return DEFAULT_NATS_URL if field == "nats_url" else ""


def add_nats_arguments(parser: argparse.ArgumentParser, *, url_from_env: bool = True,
                       nkey_default: str | None = None, nkey_help: str | None = None) -> None:
    """Add ``--nats-url`` (comma-separated list), ``--nats-creds``, ``--nats-nkey`` and ``--nats-tls-*``.

    ``url_from_env=False`` leaves ``--nats-url`` None when not given (``./cy up`` then starts its own).
    ``nkey_default``/``nkey_help`` replace ``--nats-nkey``'s (an operator command defaults to the
    operator's seed).
    """
    g = parser.add_argument_group("NATS", "where the bus is; a cluster is given as a comma-separated list of its "
                                  "nodes (any one is enough to start; the others are learnt and failed over to)")
    g.add_argument("--nats-url", type=_url_list, metavar="URL[,URL...]",
                   default=env_default("nats_url") if url_from_env else None,
                   help=f"NATS servers (default: $CY_NATS_URL, $NATS_URL or {DEFAULT_NATS_URL})")
    g.add_argument("--nats-creds", default=env_default("nats_creds"), metavar="FILE",
                   help="user credentials file (JWT + NKey seed) (default: $CY_NATS_CREDS or $NATS_CREDS)")
    g.add_argument("--nats-nkey", default=env_default("nats_nkey") if nkey_default is None else nkey_default,
                   metavar="FILE", help=nkey_help or f"NATS nkey seed file of this service's user (default: "
                   f"${NKEY_ENV}; none: connect unauthenticated, for a development server on loopback)")
    g.add_argument("--nats-tls-ca", default=env_default("nats_tls_ca"), metavar="FILE",
                   help="CA certificate to verify the servers with (default: $CY_NATS_TLS_CA or $NATS_CA)")
    g.add_argument("--nats-tls-cert", default=env_default("nats_tls_cert"), metavar="FILE",
                   help="client certificate for mutual TLS (default: $CY_NATS_TLS_CERT or $NATS_CERT)")
    g.add_argument("--nats-tls-key", default=env_default("nats_tls_key"), metavar="FILE",
                   help="private key of --nats-tls-cert (default: $CY_NATS_TLS_KEY or $NATS_KEY)")


def options_from_args(args: argparse.Namespace) -> NatsOptions:
    """The ``NatsOptions`` part of parsed arguments (for commands without a config struct)."""
    return NatsOptions(**{f: getattr(args, f) or "" for f in NatsOptions.__struct_fields__ if hasattr(args, f)})


def option_problems(options: NatsOptions) -> list[str]:
    """Why these options cannot work (missing files, a key without a certificate); empty when fine."""
    problems = []
    for flag, path in (("--nats-creds", options.nats_creds), ("--nats-nkey", options.nats_nkey),
                       ("--nats-tls-ca", options.nats_tls_ca),
                       ("--nats-tls-cert", options.nats_tls_cert), ("--nats-tls-key", options.nats_tls_key)):
        if path and not os.path.isfile(path):
            problems.append(f"{flag} {path}: no such file")
    if bool(options.nats_tls_cert) != bool(options.nats_tls_key):
        problems.append("--nats-tls-cert and --nats-tls-key go together")
    return problems


def child_arguments(options: NatsOptions) -> list[str]:
    """The flags that hand the same NATS options to a child process."""
    argv = ["--nats-url", options.nats_url]
    for field in ("nats_creds", "nats_nkey", "nats_tls_ca", "nats_tls_cert", "nats_tls_key"):
        if value := getattr(options, field):
            argv += [f"--{field.replace('_', '-')}", value]
    return argv


def as_options(target: NatsOptions | str, nkey: str = "") -> NatsOptions:
    """``target`` as ``NatsOptions``: a plain string is a server list without credentials.

    ``nkey``, when given, is the seed file to authenticate with instead of ``target``'s own.
    """
    options = NatsOptions(nats_url=target) if isinstance(target, str) else target
    return msgspec.structs.replace(options, nats_nkey=nkey) if nkey else options


def _tls_context(options: NatsOptions) -> ssl.SSLContext | None:
    if not options.uses_tls:
        return None
    context = ssl.create_default_context(cafile=options.nats_tls_ca or None)
    if options.nats_tls_cert:
        context.load_cert_chain(options.nats_tls_cert, options.nats_tls_key or None)
    return context


def connect_kwargs(options: NatsOptions) -> dict[str, object]:
    """The nats-py ``connect`` arguments for these options (servers, credentials, TLS)."""
    kwargs: dict[str, object] = {"servers": options.servers}
    if options.nats_creds:
        kwargs["user_credentials"] = options.nats_creds
    if options.nats_nkey:
        kwargs["nkeys_seed"] = options.nats_nkey
    if (tls := _tls_context(options)) is not None:
        kwargs["tls"] = tls
    return kwargs


async def connect(target: NatsOptions | str, name: str,
                  on_reconnect: Callable[[], None] | None = None, *, nkey: str = "",
                  inbox: str | None = None) -> Client:
    """Connect with reconnects forever, to any node of the list, with logged state changes.

    Reconnecting keeps every subscription (nats-py re-sends them), so pull consumers and
    inboxes survive a node's loss; the server list grows with the nodes the cluster announces.
    ``on_reconnect`` is called after each reconnection (core messages sent meanwhile were lost).
    The user is ``options.nats_nkey`` (or ``nkey``), the seed file of this service's NATS user (its
    key is fixed at the first connect: a rotated seed needs a restart); ``inbox`` its inbox root
    (``names.identity_inbox``), the only ``_INBOX`` subjects its user may subscribe to.
    """
    options = as_options(target, nkey)
    client: list[Client] = []

    async def on_disconnect() -> None:
        if client and (client[0].is_closed or client[0].is_draining):
            log.debug("%s: NATS connection closed", name)  # our own drain/close, not a failure
            return
        log.warning("%s: disconnected from NATS", name)

    async def reconnected() -> None:
        url = client[0].connected_url if client else None
        log.info("%s: reconnected to NATS at %s", name, url.netloc if url else "?")
        if on_reconnect is not None:
            on_reconnect()

    async def on_error(exc: Exception) -> None:
        log.warning("%s: NATS error: %s", name, exc)

    nc = await nats.connect(
        **connect_kwargs(options),
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        disconnected_cb=on_disconnect,
        reconnected_cb=reconnected,
        error_cb=on_error,
        **({"inbox_prefix": inbox} if inbox else {}),
    )
    client.append(nc)
    return nc


async def flush(nc: Client, timeout: float = 10.0) -> None:
    """Return once the server has every command ``nc`` queued before this call (SUB, PUB, UNSUB).

    nats-py 2.16's ``flush`` writes its PING straight to the socket, ahead of the commands still
    queued for the client's flusher task, so its PONG proves nothing about a subscription made just
    before it: in one CI run an engine answered "ready" and a control request to it then got "no
    responders". The flusher task runs before that PONG can be read, so the second PING is written
    after the queued commands and its PONG proves them (``tests/common/test_bus_flush.py``).
    """
    await nc.flush(timeout)
    await nc.flush(timeout)


async def drain(nc: Client | None, timeout: float = 5.0) -> None:
    """Flush what is pending (cancels, token events) and close ``nc``; never hang on a dead server, and
    nothing to do for a connection never opened or already closed (every service's last shutdown step)."""
    if nc is None or nc.is_closed:
        return
    try:
        async with asyncio.timeout(timeout):
            await nc.drain()
    except (TimeoutError, nats.errors.Error) as exc:
        log.warning("NATS drain did not complete (%s); closing", type(exc).__name__)
        # close() flushes to the old transport, which raises when the server is gone.
        with contextlib.suppress(OSError, nats.errors.Error):
            await nc.close()
