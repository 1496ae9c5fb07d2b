"""Connecting to NATS the same way in every service, and the one meaning of "the bus is down"."""

from __future__ import annotations

import argparse
import logging
import os

import nats
import nats.errors
from nats.aio.client import Client

log = logging.getLogger(__name__)

# Connection states in which nothing reaches the server now (closed, draining, reconnecting, a full
# outbound buffer, a stale connection). Every service catches exactly these as "the bus is down";
# what a caller adds to them (a timeout, no responders) is its own decision.
BUS_DOWN: tuple[type[Exception], ...] = (
    nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError, nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError, nats.errors.StaleConnectionError)

# Env fallback of --nats-nkey: the seed file of this process's NATS user (./cy up sets the flag).
NKEY_ENV = "CY_NATS_NKEY"


def add_nkey_argument(parser: argparse.ArgumentParser) -> None:
    """``--nats-nkey FILE`` (default ``$CY_NATS_NKEY``): the nkey seed this process authenticates with."""
    parser.add_argument("--nats-nkey", default=os.environ.get(NKEY_ENV, ""), metavar="FILE",
                        help=f"NATS nkey seed file of this service's user (default: ${NKEY_ENV}; "
                             "none: connect unauthenticated, for a development server on loopback)")


async def connect(url: str, name: str, *, nkey: str = "", inbox: str | None = None) -> Client:
    """Connect with reconnects forever (a restarted server is picked up) and logged state changes.

    ``nkey`` is the seed file of this service's NATS user (its key is fixed at the first connect:
    a rotated seed needs a restart); ``inbox`` its inbox root (``names.identity_inbox``), the only
    ``_INBOX`` subjects its user may subscribe to.
    """

    client: list[Client] = []

    async def on_disconnect() -> None:
        if client and (client[0].is_closed or client[0].is_draining):
            log.debug("%s: NATS connection closed", name)  # our own drain/close, not a failure
            return
        log.warning("%s: disconnected from NATS", name)

    async def on_reconnect() -> None:
        log.info("%s: reconnected to NATS", name)

    async def on_error(exc: Exception) -> None:
        log.warning("%s: NATS error: %s", name, exc)

    nc = await nats.connect(
        url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        error_cb=on_error,
        **_auth_options(nkey, inbox),
    )
    client.append(nc)
    return nc


def _auth_options(nkey: str, inbox: str | None) -> dict:
    """nats-py's options for an nkey user and its inbox root (none given: the defaults)."""
    options: dict = {}
    if nkey:
        options["nkeys_seed"] = nkey
    if inbox:
        options["inbox_prefix"] = inbox
    return options
