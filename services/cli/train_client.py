"""The HTTP side of ``./cy train``: an edge's training endpoints, with errors as ``CliError``s."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from services.cli.errors import CliError

DEFAULT_URL = "http://127.0.0.1:8080"  # where ./cy up serves the edge


class EdgeClient:
    """One session to an edge: ``async with EdgeClient(url, api_key) as edge: ...``."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._headers = headers
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> EdgeClient:
        self._session = aiohttp.ClientSession(headers=self._headers)
        return self

    async def __aexit__(self, *exc) -> None:
        if self._session is not None:
            await self._session.close()

    async def _check(self, resp: aiohttp.ClientResponse) -> None:
        if resp.status < 400:
            return
        text = await resp.text()
        try:
            err = json.loads(text)["error"]
            detail = f"{err.get('code') or err.get('type')}: {err.get('message')}"
        except (ValueError, KeyError, TypeError):
            detail = text.strip()[:500] or resp.reason
        raise CliError(f"{resp.method} {resp.url.path} failed with HTTP {resp.status} ({detail})")

    def _unreachable(self, exc: Exception) -> CliError:
        return CliError(f"cannot reach the edge at {self.url} ({exc}); is ./cy up running, or is --url right?")

    async def request(self, method: str, path: str, body: dict | None = None) -> dict:
        """A JSON request; the JSON answer."""
        assert self._session is not None
        try:
            async with self._session.request(method, self.url + path, json=body,
                                             timeout=aiohttp.ClientTimeout(total=self._timeout)) as resp:
                await self._check(resp)
                return await resp.json()
        except aiohttp.ClientConnectionError as exc:
            raise self._unreachable(exc) from None
        except TimeoutError:
            raise CliError(f"the edge at {self.url} did not answer {method} {path} within {self._timeout:g}s") from None

    async def upload(self, path: Path, purpose: str = "fine-tune") -> dict:
        """``POST /v1/files``: upload a training file; its file object."""
        assert self._session is not None
        try:
            with path.open("rb") as handle:
                form = aiohttp.FormData()
                form.add_field("purpose", purpose)
                form.add_field("file", handle, filename=path.name, content_type="application/octet-stream")
                async with self._session.post(self.url + "/v1/files", data=form) as resp:
                    await self._check(resp)
                    return await resp.json()
        except aiohttp.ClientConnectionError as exc:
            raise self._unreachable(exc) from None
        except OSError as exc:
            raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None

    async def download(self, path: str) -> bytes:
        """The raw bytes of a ``GET`` (a file's content)."""
        assert self._session is not None
        try:
            async with self._session.get(self.url + path, timeout=aiohttp.ClientTimeout(total=self._timeout)) as resp:
                await self._check(resp)
                return await resp.read()
        except aiohttp.ClientConnectionError as exc:
            raise self._unreachable(exc) from None

    async def events(self, path: str) -> AsyncIterator[dict]:
        """The JSON ``data:`` events of an SSE stream (comments and keep-alives skipped)."""
        assert self._session is not None
        try:
            # No total timeout: a job may train for hours; the edge's keep-alives show the stream is alive.
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._timeout)
            async with self._session.get(self.url + path, timeout=timeout) as resp:
                await self._check(resp)
                async for raw in resp.content:
                    line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                    if line.startswith("data: "):
                        yield json.loads(line[len("data: "):])
        except aiohttp.ClientConnectionError as exc:
            raise self._unreachable(exc) from None
