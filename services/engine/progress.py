"""How far one request got on an engine: what ``EngineService`` sends last for it."""

from __future__ import annotations

import time
from dataclasses import dataclass

import msgspec

from schemas.cache import CachedResponse
from schemas.events import StreamEnd, StreamError, TokenDelta, Usage, encode
from schemas.inference import InferenceRequest
from services.engine.backend import Chunk
from services.engine.response_cache import ResponseRecorder


@dataclass
class Progress:
    """How far one request got: deltas sent, first-token time, its terminal event, its cacheable response."""

    seq: int = 0
    first: float = 0.0
    terminal: bytes | None = None
    cached: CachedResponse | None = None

    def delta(self, req: InferenceRequest, chunk: Chunk) -> bytes:
        """``chunk`` as the next ``TokenDelta`` of ``req``."""
        return encode(TokenDelta(id=req.id, seq=self.seq + 1, text=chunk.text, token_ids=chunk.token_ids,
                                 logprobs=chunk.logprobs or [], dispatch=req.dispatch))

    def sent(self, chunk: Chunk, recorder: ResponseRecorder | None) -> None:
        """The delta of ``chunk`` is out (from the event loop or the model thread): count it, and record its text
        for the response cache; the first one's time is the time to first token."""
        self.seq += 1
        self.first = self.first or time.monotonic()
        if recorder is not None:
            recorder.delta(chunk.text, chunk.token_ids)

    def end(self, req: InferenceRequest, reason: str, usage: Usage, cached_tokens: int) -> None:
        """End ``req`` with a ``StreamEnd`` numbered after the last event sent (``cached_tokens`` in its usage)."""
        self.seq += 1
        self.terminal = encode(StreamEnd(id=req.id, seq=self.seq, finish_reason=reason, dispatch=req.dispatch,
                                         usage=msgspec.structs.replace(usage, cached_tokens=cached_tokens)))

    def fail(self, req: InferenceRequest, code: str, message: str, param: str | None = None) -> None:
        """End ``req`` with a ``StreamError`` numbered after the last event sent."""
        self.terminal = encode(StreamError(id=req.id, seq=self.seq + 1, code=code, message=message, param=param,
                                           dispatch=req.dispatch))
