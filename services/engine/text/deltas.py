"""Engine output deltas to ``Chunk``s, cut at stop strings. Pure logic, shared by the backends over external engines.

Engines such as TensorRT-LLM, MindIE and MLX already detokenize and hand back text deltas plus
the token ids behind them; what they do not all do alike is stop strings. ``TextStream`` applies
our ``StopMatcher`` on top, so a stop string is never sent, not even its first characters, and
keeps each token id with the text it produced (ids of text held back go out with that text).
"""

from __future__ import annotations

from collections.abc import Sequence

from services.engine.backend import Chunk
from services.engine.text.detok import StopMatcher


class TextStream:
    """One request's output: ``push`` each engine delta, ``finish`` at the end."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stop = StopMatcher(stops)
        self._pending: list[int] = []
        #: Token ids the engine produced so far (including ones behind held-back or cut text).
        self.tokens = 0
        #: Characters released so far.
        self.released = 0

    @property
    def stopped(self) -> bool:
        """A stop string appeared: the text before it has been released and nothing more will be."""
        return self._stop.stopped

    def push(self, text: str, token_ids: Sequence[int] = (), *, tokens: int | None = None) -> Chunk | None:
        """Add one engine delta; return the chunk now safe to send, if any.

        ``tokens`` is the delta's token count for engines that stream text without ids.
        """
        if self._stop.stopped:
            return None
        self.tokens += len(token_ids) if tokens is None else tokens
        self._pending.extend(token_ids)
        out = self._stop.feed(text)
        if not out:
            return None
        self.released += len(out)
        chunk = Chunk(out, self._pending)
        self._pending = []
        return chunk

    def finish(self, final_length: int | None = None) -> Chunk | None:
        """Everything still held back (text that might have begun a stop string) and unsent ids.

        ``final_length`` is the engine's own final text length when it trimmed a stop string it
        matched itself: held-back text past it was that stop string's beginning and is dropped.
        """
        rest = "" if self._stop.stopped else self._stop.flush()
        if final_length is not None:
            rest = rest[:max(0, final_length - self.released)]
        self.released += len(rest)
        if not rest and not self._pending:
            return None
        chunk = Chunk(rest, self._pending)
        self._pending = []
        return chunk
