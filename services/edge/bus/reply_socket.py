"""The edge's reply socket: engines on this host write token events here instead of through nats-server.

``ReplySocket.start()`` listens on ``<dir>/<edge id>.sock`` (see ``services.common.reply_socket``)
and hands every event it reads to the ``ReplyRouter``, exactly as the NATS inbox does; nothing is
ever written back. A connection that sends something no engine would (a bad frame) is closed. A
connection that closes mid-answer needs nothing here: its engine died (its heartbeats stop, and
the liveness sweep fails its requests over) or it stopped after ending every request. The socket
files of edges killed before they could remove their own are removed by the next edge to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from services.common import reply_socket
from services.edge.bus.replies import ReplyRouter

log = logging.getLogger(__name__)


class _Connection(asyncio.Protocol):
    """One engine's connection: frames in, events to the router."""

    def __init__(self, router: ReplyRouter, open_: set[asyncio.BaseTransport]) -> None:
        self._route = router.route
        self._rest = b""
        self._open = open_
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._open.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._open.discard(self._transport)

    def data_received(self, data: bytes) -> None:
        try:
            frames, self._rest = reply_socket.split_frames(self._rest + data if self._rest else data)
        except (ValueError, UnicodeDecodeError) as exc:
            log.warning("closing a reply socket connection that sent a bad frame: %s", exc)
            if self._transport is not None:
                self._transport.abort()
            return
        route = self._route
        for request_id, event in frames:
            route(request_id, event)


class ReplySocket:
    """The Unix socket of one edge; ``name`` is what its requests carry in ``reply_socket``."""

    def __init__(self, router: ReplyRouter, directory: Path, name: str) -> None:
        self.name = name
        self.path = reply_socket.socket_path(directory, name)
        self._router = router
        self._server: asyncio.AbstractServer | None = None
        self._open: set[asyncio.BaseTransport] = set()

    async def start(self) -> None:
        """Listen (a stale socket file of a dead edge with the same id is replaced)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.get_running_loop().create_unix_server(
            lambda: _Connection(self._router, self._open), str(self.path))
        self.path.chmod(0o600)

    async def stop(self) -> None:
        """Stop listening, close the engines' connections and remove the socket file."""
        if self._server is None:
            return
        self._server.close()
        for transport in list(self._open):
            transport.close()
        await self._server.wait_closed()
        self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


async def open_reply_socket(router: ReplyRouter, directory: str, edge_id: str) -> ReplySocket | None:
    """Start the edge's reply socket, or ``None`` (logged) where none can be made: the bus carries every event."""
    if not reply_socket.valid_name(edge_id):
        log.warning("edge id %r cannot name a reply socket: every event comes through NATS", edge_id)
        return None
    try:
        where = reply_socket.socket_dir(directory)
        if stale := reply_socket.remove_stale(where, edge_id):
            log.info("removed %d reply sockets of edges that are gone: %s", len(stale), ", ".join(stale))
        sock = ReplySocket(router, where, edge_id)
        await sock.start()
    except OSError as exc:
        log.warning("no reply socket (%s): every event comes through NATS", exc)
        return None
    log.info("reply socket %s: engines on this host send their events there", sock.path)
    return sock
