"""A TCP proxy whose link can be cut: network loss between one process and NATS, without root.

``bench/fault_matrix.py`` points one engine at this proxy instead of at nats-server. ``cut()``
makes the link lose every byte in both directions (the connections stay open, as a partition or
a pulled cable leaves them: nobody is told); ``restore()`` ends the loss and resets the
connections that lost bytes (a TCP stream with a hole cannot continue), so the client reconnects
through the proxy like it would once the network is back. iptables in a network namespace would
do the same for real packets but needs root; this does it for the one link under test.
"""

from __future__ import annotations

import asyncio
import contextlib


class CuttableLink:
    """Forwards ``127.0.0.1:<port>`` to ``target_port`` until cut."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.lossy = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._lossy_writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        """Listen on a free loopback port; the port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def cut(self) -> None:
        """From now on every byte either way is dropped."""
        self.lossy = True
        self._lossy_writers = set(self._writers)

    def restore(self) -> None:
        """Bytes flow again; connections that lost bytes are reset (their clients reconnect)."""
        self.lossy = False
        for writer in list(self._lossy_writers):
            writer.close()
        self._lossy_writers.clear()

    async def close(self) -> None:
        """Stop listening and close every connection."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return
        pair = {client_w, server_w}
        self._writers |= pair
        if self.lossy:  # opened during the loss: it loses bytes too
            self._lossy_writers |= pair
        try:
            await asyncio.gather(self._pipe(client_r, server_w), self._pipe(server_r, client_w))
        finally:
            self._writers -= pair
            self._lossy_writers -= pair

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if writer in self._lossy_writers:
                    continue  # lost on the wire
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass  # one side reset: the other is closed below
        finally:
            with contextlib.suppress(ConnectionError, OSError):
                writer.close()
