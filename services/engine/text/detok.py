"""Incremental detokenization and stop-string handling. Pure logic, shared by backends.

Text is released token by token, but never a partial UTF-8 character (decoders return
U+FFFD for those) and never text that might turn out to be the start of a stop string.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas (the prefix/read offset method of TGI and vLLM)."""

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add one generated token; return the newly complete text (possibly empty)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            delta = new_text[len(prefix_text):]
            self._prefix = self._read
            self._read = len(self.ids)
            return delta
        return ""


class ByteDetokenizer:
    """Text deltas of a tokenizer whose tokens are byte strings (GGUF's ``llama_token_to_piece``): each token's
    bytes go through one incremental UTF-8 decoder, which holds back an incomplete character.

    Same text as ``IncrementalDetokenizer`` over the joined bytes, without decoding a window twice per
    token: a few microseconds instead of 26 (measured on the default model), once per sequence per step
    in the model thread. Bytes that can never start a character come out as U+FFFD at once; an
    incomplete character at the very end is never released (as ``IncrementalDetokenizer`` does).
    """

    __slots__ = ("_piece", "_decode")

    def __init__(self, piece: Callable[[int], bytes]) -> None:
        self._piece = piece
        self._decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode

    def push(self, token_id: int) -> str:
        """Add one generated token; return the newly complete text (possibly empty)."""
        return self._decode(self._piece(token_id))


class StopMatcher:
    """Accumulates generated text and releases only what cannot be part of a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self._stops), default=0)
        self.text = ""
        self._emitted = 0
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Add ``delta``; return the text now safe to emit. Sets ``stopped`` when a stop string appears."""
        if self.stopped:
            return ""
        self.text += delta
        if not self._stops:
            out = self.text[self._emitted:]
            self._emitted = len(self.text)
            return out
        start = max(0, self._emitted - self._longest + 1)
        cut = min((i for i in (self.text.find(s, start) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = self.text[:cut]
            return self._release(cut)
        return self._release(len(self.text) - self._held_back())

    def flush(self) -> str:
        """Release everything still held back (generation ended for another reason)."""
        return self._release(len(self.text))

    def _held_back(self) -> int:
        # Longest suffix of the text that is a proper prefix of some stop string.
        tail = self.text[-self._longest:] if self._longest else ""
        for k in range(min(len(tail), self._longest - 1), 0, -1):
            suffix = tail[-k:]
            if any(s.startswith(suffix) for s in self._stops):
                return k
        return 0

    def _release(self, upto: int) -> str:
        upto = max(upto, self._emitted)
        out = self.text[self._emitted:upto]
        self._emitted = upto
        return out
