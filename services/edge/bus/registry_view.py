"""The model registry (KV ``llm_models``) as the edge sees it: followed with a KV watch, read without I/O.

A request for a model no live engine serves yet but the registry knows is published anyway: the
scheduler's cold start loads it on an engine first. Only base models count here (an adapter is
asked for as ``<base>:<adapter>`` and its base must resolve).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from schemas import names
from schemas.registry import BASE, ModelEntry
from services.common.lifecycle import cancel_and_wait

log = logging.getLogger(__name__)
_REMOVED = ("DEL", "PURGE")
_DECODER = msgspec.json.Decoder(ModelEntry)


class RegistryView:
    """Base models of the registry by id and alias, kept current by a watch."""

    def __init__(self) -> None:
        self._by_key: dict[str, ModelEntry] = {}
        self._names: dict[str, str] = {}
        self._watcher = None
        self._task: asyncio.Task[None] | None = None

    def resolve(self, name: str) -> str | None:
        """The canonical id of a registered base model called ``name`` (id or alias), else None."""
        return self._names.get(name)

    async def start(self, js: JetStreamContext) -> None:
        """Load the registry and follow it; a missing bucket means no cold starts from this edge."""
        try:
            kv = await js.key_value(names.MODELS_BUCKET)
        except nats.js.errors.BucketNotFoundError:
            log.warning("KV bucket %s is missing: only models engines serve now are accepted", names.MODELS_BUCKET)
            return
        self._watcher = await kv.watchall()
        self._task = asyncio.create_task(self._follow(self._watcher), name="edge-registry-watch")

    async def stop(self) -> None:
        """Stop following the registry."""
        if self._task is not None:
            await cancel_and_wait(self._task)
        if self._watcher is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._watcher.stop()

    async def _follow(self, watcher) -> None:
        async for entry in watcher:
            if entry is None:  # end of the initial values
                continue
            if entry.operation in _REMOVED or not entry.value:
                self._by_key.pop(entry.key, None)
            else:
                try:
                    self._by_key[entry.key] = _DECODER.decode(entry.value)
                except msgspec.DecodeError:
                    log.warning("ignoring a malformed registry entry %s", entry.key)
                    continue
            self._rebuild()

    def _rebuild(self) -> None:
        found: dict[str, str] = {}
        for e in self._by_key.values():
            if e.kind == BASE:
                for name in (e.id, *e.aliases):
                    found.setdefault(name, e.id)
        self._names = found
