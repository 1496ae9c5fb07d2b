"""A SIMULATED engine for load, capacity and fault tests: no model, configurable token rate.

Never the default: it is chosen only with ``--engine simulated``. It produces the words
``tok1 tok2 ...`` at ``token_rate`` tokens/s per request (0 = as fast as the loop runs) after a
``ttft`` delay, honours ``max_tokens``, ``stop``, ``abort`` and ``continuation`` (it carries on
counting after the words already delivered), and counts prompt tokens as whitespace-separated
words. It exists to measure the pipeline's own overhead and to run fault
tests (engine killed mid-stream) without the cost of a real model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from schemas.errors import BusError, ErrorCode
from schemas.heartbeat import ServedModel
from schemas.inference import InferenceRequest
from services.engine.backend import Chunk, EngineBackend, Finished, GenerationEvent, refuse_logprobs
from services.engine.text.detok import StopMatcher


class SimulatedEngine(EngineBackend):
    """Deterministic fake token stream behind the real engine interface."""

    name = "simulated"

    def __init__(self, *, model_id: str, aliases: Sequence[str] = (), slots: int = 64, token_rate: float = 0.0,
                 ttft: float = 0.0, context_length: int = 8192, **_: object) -> None:
        self._model_id = model_id
        self._aliases = list(aliases)
        self._slots = slots
        self._delay = 1.0 / token_rate if token_rate > 0 else 0.0
        self._ttft = ttft
        self._context_length = context_length
        self._aborted: set[str] = set()

    async def start(self) -> None:
        """Nothing to load."""

    async def check_health(self) -> None:
        """Always able to serve."""

    @property
    def slots(self) -> int:
        """Concurrent requests accepted."""
        return self._slots

    def served_models(self) -> list[ServedModel]:
        """The configured model id."""
        return [ServedModel(id=self._model_id, context_length=self._context_length, aliases=self._aliases)]

    async def generate(self, request: InferenceRequest) -> AsyncIterator[GenerationEvent]:
        """Yield ``tokN`` words until ``max_tokens`` or a stop string (``logprobs``: ``unsupported``, it has no model)."""
        refuse_logprobs(request, "simulated")
        text = request.prompt if request.prompt is not None else " ".join(m.content for m in request.messages or [])
        prompt_tokens = max(1, len(text.split()))
        if prompt_tokens >= self._context_length:
            raise BusError(ErrorCode.CONTEXT_LENGTH_EXCEEDED, f"prompt has {prompt_tokens} tokens, "
                           f"maximum context length is {self._context_length}")
        stop = StopMatcher(request.sampling.stop)
        if self._ttft:
            await asyncio.sleep(self._ttft)
        # A migrated request continues the numbering after the words already delivered, so a
        # continued answer is word for word the one an uninterrupted engine would have given.
        before = len(request.continuation.split())
        produced = 0
        reason = "length"
        try:
            while produced < request.sampling.max_tokens:
                if request.id in self._aborted:
                    return
                produced += 1
                out = stop.feed(f"tok{before + produced} ")
                if out:
                    yield Chunk(out, [before + produced])
                if stop.stopped:
                    reason = "stop"
                    break
                if self._delay:
                    await asyncio.sleep(self._delay)
                elif produced % 16 == 0:
                    await asyncio.sleep(0)
            rest = stop.flush() if not stop.stopped else ""
            if rest:
                yield Chunk(rest, [])
            yield Finished(reason, prompt_tokens, produced)
        finally:
            self._aborted.discard(request.id)

    async def abort(self, request_id: str) -> None:
        """The generator returns at its next token."""
        self._aborted.add(request_id)
