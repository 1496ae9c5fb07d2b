"""Where an engine sends a request's events: its edge's reply socket on this host, or its reply subject.

``ReplySender.sender(req)`` is called once per request, before its ``StreamStart``, and returns
the coroutine function every event of the request goes through, so all of them take one way in
order (``services/common/reply_socket.py``). The socket is taken when the request names one, this
engine may use it, and it opens; one connection per edge is kept and shared by its requests. A
socket that does not open (the edge is on another host) is not tried again for ``RETRY_AFTER``
seconds. Should the connection close or ``BUFFER_LIMIT`` bytes wait in it (the edge stopped
reading) mid-answer, the remaining events go to the reply subject: the edge notices any gap by
``seq`` and continues the request elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from schemas.inference import InferenceRequest
from services.common import reply_socket

log = logging.getLogger(__name__)

Send = Callable[[bytes], Awaitable[None]]
Publish = Callable[[str, bytes], Awaitable[None]]

RETRY_AFTER = 10.0  # seconds before a socket that did not open is tried again
CONNECT_TIMEOUT = 1.0
BUFFER_LIMIT = 16 << 20  # bytes written and not yet read by the edge before the bus takes over


class _Link(asyncio.Protocol):
    """One connection to an edge's socket (nothing comes back on it); knows when not to write to it."""

    def __init__(self, on_lost: Callable[[_Link], None]) -> None:
        self.transport: asyncio.WriteTransport | None = None
        self.usable = True  # open, and its buffer below the high-water mark
        self._on_lost = on_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # Far above what a pause of the edge's event loop (a collection, a burst of requests) leaves
        # unread: past it every stream on the link would move to the bus and be continued elsewhere.
        self.transport.set_write_buffer_limits(high=BUFFER_LIMIT)

    def connection_lost(self, exc: Exception | None) -> None:
        self.usable = False
        self.transport = None
        self._on_lost(self)

    def pause_writing(self) -> None:
        self.usable = False

    def resume_writing(self) -> None:
        self.usable = self.transport is not None


class ReplySender:
    """The engine's connections to edges' reply sockets."""

    def __init__(self, publish: Callable[[], Publish], *, enabled: bool, directory: str) -> None:
        self._publish = publish  # the NATS connection's publish, looked up once per request
        self._dir: Path | None = (Path(directory) if directory else reply_socket.default_dir()) if enabled else None
        self._links: dict[str, _Link] = {}
        self._opening: dict[str, asyncio.Future[_Link | None]] = {}
        self._failed: dict[str, float] = {}  # socket name -> when it last did not open
        self.sockets = 0  # requests sent through a socket (tests, debugging)

    async def sender(self, req: InferenceRequest) -> Send:
        """What every event of ``req`` is sent with, chosen now for all of them."""
        publish, subject = self._publish(), req.reply_to
        name = req.reply_socket
        request_id = subject[subject.rfind(".") + 1:].encode()
        link = await self._link(name) if name and self._dir is not None and 0 < len(request_id) < 256 \
            and request_id.isascii() else None
        if link is None:
            return lambda data: publish(subject, data)
        self.sockets += 1
        frame = reply_socket.frame

        async def send(data: bytes) -> None:
            if link.usable:
                link.transport.write(frame(request_id, data))  # type: ignore[union-attr]
            else:  # closed, or the edge stopped reading: the bus takes the rest
                await publish(subject, data)
        return send

    async def _link(self, name: str) -> _Link | None:
        link = self._links.get(name)
        if link is not None and link.transport is not None:
            return link
        if (opening := self._opening.get(name)) is not None:
            return await asyncio.shield(opening)
        if not reply_socket.valid_name(name) or time.monotonic() - self._failed.get(name, -RETRY_AFTER) < RETRY_AFTER:
            return None
        opening = self._opening[name] = asyncio.get_running_loop().create_future()
        link = None
        try:
            assert self._dir is not None
            path = reply_socket.socket_path(self._dir, name)
            async with asyncio.timeout(CONNECT_TIMEOUT):
                _, link = await asyncio.get_running_loop().create_unix_connection(
                    lambda: _Link(lambda lost: self._forget(name, lost)), str(path))
            self._links[name] = link
            self._failed.pop(name, None)
        except (OSError, TimeoutError) as exc:
            self._failed[name] = time.monotonic()
            log.debug("reply socket %s did not open (%s): its events go through NATS", name, exc)
        finally:
            del self._opening[name]
            opening.set_result(link)
        return link

    def _forget(self, name: str, link: _Link) -> None:
        """A connection closed (its edge stopped): drop it; a later request opens a new one if the edge is back."""
        if self._links.get(name) is link:
            del self._links[name]

    async def close(self) -> None:
        """Close every connection (after the last terminal event was written: the buffers are sent first)."""
        for link in list(self._links.values()):
            if link.transport is not None:
                link.transport.close()
        self._links.clear()
