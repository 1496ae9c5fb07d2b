"""How far one request got on an engine: what ``EngineService`` sends last for it."""

from __future__ import annotations

from dataclasses import dataclass

from schemas.cache import CachedResponse
from schemas.events import StreamError, encode
from schemas.inference import InferenceRequest


@dataclass
class Progress:
    """How far one request got: deltas sent, first-token time, its terminal event, its cacheable response."""

    seq: int = 0
    first: float = 0.0
    terminal: bytes | None = None
    cached: CachedResponse | None = None

    def fail(self, req: InferenceRequest, code: str, message: str, param: str | None = None) -> None:
        """End ``req`` with a ``StreamError`` numbered after the last event sent."""
        self.terminal = encode(StreamError(id=req.id, seq=self.seq + 1, code=code, message=message, param=param,
                                           dispatch=req.dispatch))
