"""Reading the prompt cache (KV ``llm_prompt_cache``): look a key up, through a memory mirror.

Shared by the edge (which answers the HTTP hits it can itself) and the scheduler (which answers
the rest from the queue, see ``services.scheduler.prompt_cache``). Entries are written by the
engine that generated them (see ``services.engine.response_cache``); their TTL and the bucket's
byte bound are the bucket's own, set in ``infra/nats/jetstream.toml`` and changed on a running
cluster with ``./cy infra apply --update``. A lookup that fails for any bus reason is a miss: the
request is generated, never lost.

With a mirror (``mirror_bytes`` > 0), hits this process read lately are kept in memory
(``cache_mirror.CacheMirror``) so a repeated hit costs no round trip to KV. A watch of the
bucket's subjects (headers only, new messages only) drops a kept entry as soon as its key
changes, and a look at the bucket's stream every ``check_interval`` drops entries the bucket
expired or evicted since; if the watch falls behind, the mirror is emptied and unused until it
catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.kv import KeyValue

from schemas import names
from schemas.cache import CachedResponse
from services.common.bus import BUS_DOWN
from services.common.cache_mirror import CacheMirror
from services.common.lifecycle import cancel_and_wait

log = logging.getLogger(__name__)

_decoder = msgspec.json.Decoder(CachedResponse)
_LOOKUP_ERRORS = (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.APIError, *BUS_DOWN)


class PromptCacheReader:
    """Reads entries of ``kv``, through the mirror when there is one.

    ``async with PromptCacheReader(...)`` starts and stops the mirror's watch and checks.
    """

    def __init__(self, nc: Client, kv: KeyValue, *, mirror_bytes: int = 0, check_interval: float = 1.0,
                 bucket: str = names.PROMPT_CACHE_BUCKET) -> None:
        self._nc = nc
        self._kv = kv
        self.mirror = CacheMirror(mirror_bytes) if mirror_bytes > 0 else None
        self.mirror_hits = 0
        self._check_interval = check_interval
        self._stream = names.kv_stream(bucket)
        self._subjects = names.kv_subjects(bucket)
        self._prefix = self._subjects[:-1]  # "$KV.<bucket>."
        self._watch = None
        self._checks: asyncio.Task[None] | None = None
        self._watched_seq = 0  # the last stream sequence the watch delivered
        self._last_seq = 0     # the stream's last sequence at the previous check

    async def __aenter__(self) -> PromptCacheReader:
        if self.mirror is not None:
            await self._start_mirror()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._checks is not None:
            await cancel_and_wait(self._checks)
        if self._watch is not None:
            with contextlib.suppress(nats.errors.Error):  # the connection is closing: nothing to unsubscribe
                await self._watch.unsubscribe()

    async def _start_mirror(self) -> None:
        js = self._nc.jetstream()
        try:
            info = await js.stream_info(self._stream)
            self._watch = await js.subscribe(self._subjects, stream=self._stream, cb=self._on_change,
                                             ordered_consumer=True, deliver_policy=api.DeliverPolicy.NEW,
                                             headers_only=True)
        except (nats.js.errors.Error, nats.errors.Error) as exc:
            log.warning("prompt cache mirror off (every lookup reads KV): %s", exc)
            self.mirror = None
            return
        self._watched_seq = self._last_seq = info.state.last_seq
        self.mirror.expire_before(info.state.first_seq)
        self._checks = asyncio.create_task(self._check_forever(), name="prompt-cache-mirror-checks")

    async def _on_change(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        self.mirror.changed(msg.subject[len(self._prefix):], seq)
        self._watched_seq = max(self._watched_seq, seq)

    async def _check_forever(self) -> None:
        js = self._nc.jetstream()
        while True:
            await asyncio.sleep(self._check_interval)
            try:
                state = (await js.stream_info(self._stream)).state
            except (nats.js.errors.Error, nats.errors.Error) as exc:
                if self.mirror.usable:
                    log.warning("prompt cache mirror suspended (the bucket cannot be checked): %s", exc)
                self.mirror.suspend()
                continue
            self.check(state.first_seq, state.last_seq)

    def check(self, first_seq: int, last_seq: int) -> None:
        """Apply one look at the bucket's stream: expire what it dropped; suspend if the watch fell behind.

        The watch must have delivered at least what the stream held one check earlier; if not,
        changes may have been missed (a lost watch, a reconnect), and nothing kept can be trusted.
        """
        mirror = self.mirror
        # Messages up to the previous last sequence that the stream no longer holds need no watching.
        behind = self._watched_seq < self._last_seq and first_seq <= self._last_seq
        if behind:
            if mirror.usable:
                log.warning("prompt cache mirror suspended: its watch is behind the bucket (at %d of %d)",
                            self._watched_seq, self._last_seq)
            mirror.suspend()
        elif not mirror.usable:
            mirror.resume()
        mirror.expire_before(first_seq)
        self._last_seq = last_seq

    def kept(self, key: str) -> CachedResponse | None:
        """The response under ``key`` if the mirror holds it (no I/O); else None: ask ``lookup``."""
        if self.mirror is None:
            return None
        kept = self.mirror.get(key)
        if kept is not None:
            self.mirror_hits += 1
        return kept

    async def lookup(self, key: str) -> CachedResponse | None:
        """The stored response under ``key``, or None on a miss (absent, expired, unreadable, bus trouble)."""
        mirror = self.mirror
        if mirror is None:
            return (await self._read(key))[1]
        if (kept := self.kept(key)) is not None:
            return kept
        mirror.begin_read(key)
        revision, response, size = None, None, 0
        try:
            revision, response, size = await self._read(key)
        finally:
            mirror.end_read(key, revision, size, response)
        return response

    async def _read(self, key: str) -> tuple[int | None, CachedResponse | None, int]:
        """The entry under ``key`` from KV: its revision, decoded response and stored size."""
        try:
            entry = await self._kv.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):  # absent, deleted or expired
            return None, None, 0
        except _LOOKUP_ERRORS as exc:
            log.warning("prompt cache lookup failed (treated as a miss): %s", exc)
            return None, None, 0
        value = entry.value or b""
        try:
            return entry.revision, _decoder.decode(value), len(value)
        except msgspec.DecodeError as exc:
            log.warning("ignoring malformed prompt cache entry %s: %s", key, exc)
            return None, None, 0
