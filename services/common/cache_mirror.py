"""Prompt-cache entries this process read lately, kept in memory while the bucket still holds them.

Pure: no I/O. Used by every reader of the cache (``services.common.prompt_cache``: the edge and
each scheduler replica). A hit read from KV ``llm_prompt_cache`` is kept (with its stream sequence, the
entry's revision) so the next hit on the same key costs no round trip. An entry kept here is
served only as long as the bucket provably still has it:

- any later message on its key (a new value, a delete, a purge) drops it at once (``changed``,
  fed by a watch of the bucket's subjects); a read that may have missed such a message (one
  newer than the revision it returned, seen while it was under way) is not kept;
- the bucket drops entries from its head (TTL expiry, the byte bound, a purge of the whole
  stream), which moves its first sequence past theirs: every entry older than the first
  sequence last seen is dropped (``expire_before``, fed by a periodic look at the stream);
- while the watch cannot be trusted (``suspend``), nothing is served from here.

So a kept entry is never served after a delete or a new value of its key, and at most one check
interval after the bucket expired or evicted it. Misses are not kept: a miss goes to an engine.
"""

from __future__ import annotations

from collections import OrderedDict

from schemas.cache import CachedResponse


class CacheMirror:
    """An LRU of recently read cache entries, bounded in bytes (the size of each entry's stored value)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.first_seq = 0  # the bucket's first stream sequence at the last check
        self.usable = True
        self._entries: OrderedDict[str, tuple[int, int, CachedResponse]] = OrderedDict()
        # Keys being read from KV now (how many reads), and the newest change seen on each during a read.
        self._reading: dict[str, int] = {}
        self._dirty: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> CachedResponse | None:
        """The kept response under ``key``, if any and if the mirror may be used now."""
        if not self.usable:
            return None
        kept = self._entries.get(key)
        if kept is None:
            return None
        self._entries.move_to_end(key)
        return kept[2]

    def begin_read(self, key: str) -> None:
        """A read of ``key`` from the bucket starts (a change meanwhile must keep its result out)."""
        self._reading[key] = self._reading.get(key, 0) + 1

    def end_read(self, key: str, revision: int | None, size: int, response: CachedResponse | None) -> None:
        """The read of ``key`` ended with ``response`` (None: absent) at ``revision``; keep it if still valid."""
        left = self._reading.pop(key) - 1
        changed_at = self._dirty.get(key, 0)
        if left:
            self._reading[key] = left
        else:
            self._dirty.pop(key, None)
        # A change the read may not reflect (newer than what it returned) keeps the result out.
        if (response is None or revision is None or changed_at > revision or not self.usable
                or revision < self.first_seq or size > self.max_bytes):
            return
        self._drop(key)
        self._entries[key] = (revision, size, response)
        self.bytes += size
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def changed(self, key: str, seq: int) -> None:
        """Message ``seq`` on ``key`` reached the bucket (put, delete or purge): forget what is kept of it."""
        kept = self._entries.get(key)
        if kept is not None and kept[0] < seq:
            self._drop(key)
        if key in self._reading:
            self._dirty[key] = max(self._dirty.get(key, 0), seq)

    def expire_before(self, first_seq: int) -> None:
        """The bucket's first sequence is now ``first_seq``: drop every entry older than it."""
        self.first_seq = first_seq
        for key in [k for k, (revision, _, _) in self._entries.items() if revision < first_seq]:
            self._drop(key)

    def suspend(self) -> None:
        """Changes may have been missed: drop everything and serve nothing until ``resume``."""
        self.usable = False
        self._entries.clear()
        self.bytes = 0
        self._dirty.update(dict.fromkeys(self._reading, float("inf")))

    def resume(self) -> None:
        """Changes are followed again."""
        self.usable = True

    def _drop(self, key: str) -> None:
        kept = self._entries.pop(key, None)
        if kept is not None:
            self.bytes -= kept[1]
