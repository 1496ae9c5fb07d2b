"""The edge on the wire, for tests — no tests in here: its own runner under aiohttp's TestServer,
and raw HTTP/1.1 exchanges that an HTTP client library would refuse to send."""

from __future__ import annotations

import asyncio

from aiohttp.test_utils import TestServer

from services.edge.server import edge_runner


class EdgeTestServer(TestServer):
    """aiohttp's TestServer, serving the app with the runner ``services.edge.server`` uses."""

    def __init__(self, app, config, **kwargs) -> None:
        super().__init__(app, **kwargs)
        self.config = config

    async def _make_runner(self, **kwargs):
        return edge_runner(self.app, self.config, **kwargs)


async def exchange(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes; the status, headers and body of the answer (the server closes after an error)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def request(target: str = "/healthz", *headers: str, method: str = "GET") -> bytes:
    """A raw HTTP/1.1 request with ``headers`` (each ``Name: value``)."""
    lines = [f"{method} {target} HTTP/1.1", "Host: edge", *headers, "", ""]
    return "\r\n".join(lines).encode()
