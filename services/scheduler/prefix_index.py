"""Which engine recently served which prompt prefix, for the ``prefix_affinity`` strategy. Pure.

After SGLang's cache-aware router and Dynamo's KV router: the prompt text is cut into blocks
of ``block_chars`` characters and each block is named by a hash chained over every block
before it, so equal hashes mean equal prefixes. An LRU map holds block hash -> the engine that
last served it (bounded by ``max_blocks``). An engine's overlap with a request is the number
of leading blocks it served (its deepest matching block): its KV cache probably still holds them.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from schemas.inference import InferenceRequest


def prompt_text(req: InferenceRequest) -> str:
    """The text an engine sees first, as one string: the prompt, or the chat turns in order."""
    if req.messages is None:
        return req.prompt or ""
    return "".join(f"\x1e{m.role}\x1f{m.content}" for m in req.messages)


def block_hashes(text: str, block_chars: int) -> list[bytes]:
    """Chained hashes of the complete ``block_chars``-sized blocks of ``text`` (a partial tail is not a block)."""
    out: list[bytes] = []
    chain = b""
    for start in range(0, len(text) - block_chars + 1, block_chars):
        chain = hashlib.blake2b(chain + text[start:start + block_chars].encode(), digest_size=16).digest()
        out.append(chain)
    return out


class PrefixIndex:
    """LRU map of prefix block hash -> engine that served it last."""

    def __init__(self, *, block_chars: int = 64, max_blocks: int = 100_000) -> None:
        self.block_chars = block_chars
        self._max = max_blocks
        self._holder: OrderedDict[bytes, str] = OrderedDict()

    def blocks(self, req: InferenceRequest) -> list[bytes]:
        """The block hashes of ``req``'s prompt."""
        return block_hashes(prompt_text(req), self.block_chars)

    def overlap(self, blocks: list[bytes]) -> dict[str, int]:
        """Leading blocks of ``blocks`` each engine served: the depth of the deepest block it served last."""
        counts: dict[str, int] = {}
        for depth, h in enumerate(blocks, start=1):
            holder = self._holder.get(h)
            if holder is None:
                break
            counts[holder] = depth  # chained hashes: whoever served block i served every block before it
        return counts

    def record(self, blocks: list[bytes], worker: str) -> None:
        """``worker`` is serving a prompt made of ``blocks``: it holds them now (most recent last)."""
        for h in blocks:
            self._holder[h] = worker
            self._holder.move_to_end(h)
        while len(self._holder) > self._max:
            self._holder.popitem(last=False)

    def forget(self, worker: str) -> None:
        """Drop every block held by ``worker`` (its engine is gone, and its KV cache with it)."""
        for h in [h for h, w in self._holder.items() if w == worker]:
            del self._holder[h]

    def __len__(self) -> int:
        return len(self._holder)
