"""Where an engine sends a request's events: its edge's reply socket on this host, or its reply subject.

``ReplySender.sender(req)`` is called once per request, before its ``StreamStart``, and returns
the coroutine function every event of the request goes through, so all of them take one way in
order (``services/common/reply_socket.py``). The socket is taken when the request names one, this
engine may use it, and it opens; one connection per edge is kept and shared by its requests. A
socket that does not open (the edge is on another host) is not tried again for ``RETRY_AFTER``
seconds. Should the connection close or ``BUFFER_LIMIT`` bytes wait in it (the edge stopped
reading) mid-answer, the remaining events go to the reply subject: the edge notices any gap by
``seq`` and continues the request elsewhere.

A request sent through a socket may also have its token events written by the engine's model
thread itself (``SocketSend.writer``): straight to the socket as each step ends, without waking the
event loop once per token, which on a small host takes that CPU from the decode
(``docs/benchmarks.md``). The event loop still writes the ``StreamStart`` and the terminal event.
A lock keeps each frame whole between the two threads, and the model thread writes only while
nothing waits unsent in the loop's transport, so the frames leave in the order they were made. A
token it cannot write at once goes through the event loop, and so does the rest of that request.
The writers of one step take their frames first and send them with one ``flush``: one write, and one
wake-up of the edge, per step and edge instead of one per stream (each cost the decode 60-500 us
here, the edge taking the CPU the model thread was on). Frames taken when the connection closes
before the flush are lost, as frames in flight are: the edge sees the gap in ``seq`` and continues
the request elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from schemas.inference import InferenceRequest
from services.common import reply_socket
from services.engine.backend import Chunk

log = logging.getLogger(__name__)

Send = Callable[[bytes], Awaitable[None]]
Publish = Callable[[str, bytes], Awaitable[None]]

RETRY_AFTER = 10.0  # seconds before a socket that did not open is tried again
CONNECT_TIMEOUT = 1.0
BUFFER_LIMIT = 16 << 20  # bytes written and not yet read by the edge before the bus takes over


class _Link(asyncio.Protocol):
    """One connection to an edge's socket (nothing comes back on it); knows when not to write to it.

    The event loop writes with ``write``, a model thread with ``take`` then ``flush``, each under ``lock``.
    """

    def __init__(self, on_lost: Callable[[_Link], None]) -> None:
        self.transport: asyncio.WriteTransport | None = None
        self.usable = True  # open, and its buffer below the high-water mark
        self.lock = threading.Lock()
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queued = False  # the transport held unsent bytes after the loop's last write
        self._rest = b""  # the end of a frame the model thread wrote in part, for the loop to send first
        self._taken: list[bytes] = []  # frames a model thread took since its last flush
        self._on_lost = on_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # Far above what a pause of the edge's event loop (a collection, a burst of requests) leaves
        # unread: past it every stream on the link would move to the bus and be continued elsewhere.
        self.transport.set_write_buffer_limits(high=BUFFER_LIMIT)
        self._fd = transport.get_extra_info("socket").fileno()
        self._loop = asyncio.get_running_loop()

    def connection_lost(self, exc: Exception | None) -> None:
        with self.lock:  # asyncio closes the socket after this: no model thread writes to its number again
            self.usable = False
            self.transport = None
        self._on_lost(self)

    def pause_writing(self) -> None:
        self.usable = False

    def resume_writing(self) -> None:
        self.usable = self.transport is not None

    def write(self, data: bytes) -> None:
        """In the event loop: one frame, after whatever the model thread left to send."""
        with self.lock:
            if self.transport is None:
                return
            if self._rest:
                self.transport.write(self._rest)
                self._rest = b""
            if self._taken:  # a model thread's step, made before this frame and not flushed yet
                self.transport.write(b"".join(self._taken))
                self._taken.clear()
            self.transport.write(data)
            self._queued = self.transport.get_write_buffer_size() > 0

    def take(self, data: bytes) -> bool:
        """In a model thread, holding ``lock``: one frame for the next ``flush``. False, with nothing taken,
        when bytes wait unsent before it (in the loop's transport, or the rest of a flush)."""
        if not self.usable or self.transport is None or self._queued or self._rest:
            return False
        self._taken.append(data)
        return True

    def flush(self) -> None:
        """In a model thread, holding ``lock``: the frames taken since the last flush, in one write straight
        to the socket; what the socket does not take (full: none of it) is the loop's to send before anything else."""
        if not self._taken:
            return
        data = b"".join(self._taken)
        self._taken.clear()
        if self.transport is None:  # closed since they were taken
            return
        try:
            n = os.write(self._fd, data)
        except BlockingIOError:
            n = 0
        except OSError:  # broken: the event loop finds that out too
            return
        if n < len(data):
            self._rest = data[n:]
            self._loop.call_soon_threadsafe(self.write, b"")  # type: ignore[union-attr]


class TokenWriter:
    """Writes one request's token events from the model thread straight to its edge's socket.

    Called with each step's ``Chunk``: True once its frame is taken, to go out with the step's other
    frames at ``flush``. False means this chunk and every later event of the request go through the
    event loop instead, in order: the link failed or has bytes waiting, the engine ``stalled()``, or
    ``stop`` was called. ``encode(chunk)`` makes the event, numbered after the last one sent;
    ``sent(chunk)`` counts it as sent.
    """

    def __init__(self, link: _Link, request_id: bytes, encode: Callable[[Chunk], bytes],
                 sent: Callable[[Chunk], None], stalled: Callable[[], bool]) -> None:
        self._link = link
        self._id = request_id
        self._encode = encode
        self._sent = sent
        self._stalled = stalled
        self._off = False
        self.written = 0

    def __call__(self, chunk: Chunk) -> bool:
        link = self._link
        with link.lock:
            if self._off or self._stalled() or not link.take(reply_socket.frame(self._id, self._encode(chunk))):
                self._off = True
                return False
            self._sent(chunk)
            self.written += 1
        return True

    def flush(self) -> None:
        """Send the frames this step's writers on the same link took (none left: nothing to do)."""
        link = self._link
        with link.lock:
            link.flush()

    def stop(self) -> None:
        """No frame from the model thread after this returns (a withdrawal, a give-up, the request's end)."""
        with self._link.lock:
            self._off = True


class SocketSend:
    """Sends a request's events through its edge's socket, and once the link fails through the bus."""

    def __init__(self, link: _Link, request_id: bytes, publish: Publish, subject: str) -> None:
        self._link = link
        self._id = request_id
        self._publish = publish
        self._subject = subject

    async def __call__(self, data: bytes) -> None:
        if self._link.usable:
            self._link.write(reply_socket.frame(self._id, data))
        else:  # closed, or the edge stopped reading: the bus takes the rest
            await self._publish(self._subject, data)

    def writer(self, encode: Callable[[Chunk], bytes], sent: Callable[[Chunk], None],
               stalled: Callable[[], bool]) -> TokenWriter:
        """A model-thread writer of this request's token events (see ``TokenWriter``)."""
        return TokenWriter(self._link, self._id, encode, sent, stalled)


class ReplySender:
    """The engine's connections to edges' reply sockets."""

    def __init__(self, publish: Callable[[], Publish], *, enabled: bool, directory: str) -> None:
        self._publish = publish  # the NATS connection's publish, looked up once per request
        self._dir: Path | None = (Path(directory) if directory else reply_socket.default_dir()) if enabled else None
        self._links: dict[str, _Link] = {}
        self._opening: dict[str, asyncio.Future[_Link | None]] = {}
        self._failed: dict[str, float] = {}  # socket name -> when it last did not open
        self._writers: dict[str, TokenWriter] = {}  # requests whose token events a model thread writes
        self.sockets = 0  # requests sent through a socket (tests, debugging)
        self.thread_frames = 0  # token events written by model threads, of requests ended (tests, debugging)

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
        return SocketSend(link, request_id, publish, subject)

    def writer(self, request_id: str, send: Send, encode: Callable[[Chunk], bytes], sent: Callable[[Chunk], None],
               stalled: Callable[[], bool]) -> TokenWriter | None:
        """A model-thread writer of the request's token events if ``send`` takes them through a socket
        (``TokenWriter``); ``end_writer`` when the request ends."""
        if not isinstance(send, SocketSend):
            return None
        writer = self._writers[request_id] = send.writer(encode, sent, stalled)
        return writer

    def stop_writer(self, request_id: str) -> None:
        """No more token events of the request from the model thread (withdrawn, given up on)."""
        if (writer := self._writers.get(request_id)) is not None:
            writer.stop()

    def end_writer(self, request_id: str) -> None:
        """The request ended: its writer stops and is forgotten."""
        writer = self._writers.pop(request_id)
        writer.stop()
        self.thread_frames += writer.written

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
