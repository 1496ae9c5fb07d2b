"""Connecting to NATS the same way in every service, and the one meaning of "the bus is down"."""

from __future__ import annotations

import logging

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


async def connect(url: str, name: str) -> Client:
    """Connect with reconnects forever (a restarted server is picked up) and logged state changes."""

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
    )
    client.append(nc)
    return nc
