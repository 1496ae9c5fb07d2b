"""The one interface every engine implements (after vLLM's ``EngineClient``).

A backend turns an ``InferenceRequest`` into an async stream of ``Chunk``s ending with one
``Finished``; it raises ``BusError`` for a request it cannot serve. Backends are imported
lazily (see ``backends/__init__.py``) so running one engine never imports another's library.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from schemas.errors import BusError, ErrorCode
from schemas.events import TokenLogprob
from schemas.heartbeat import ServedModel
from schemas.inference import InferenceRequest


@dataclass(slots=True)
class Chunk:
    """Newly generated text and the token ids that produced it (and their log-probabilities, if asked for)."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None


class ChunkWriter(Protocol):
    """Writes one request's chunks from the model thread (``services/engine/replies.TokenWriter``, see
    ``EngineBackend.write_through``)."""

    def __call__(self, chunk: Chunk) -> bool:
        """Take ``chunk`` (True); False: it, and the rest of the request, go through the loop."""

    def flush(self) -> None:
        """Send what was taken in this step (together with other writers' frames on the same connection)."""


@dataclass(slots=True)
class Finished:
    """End of a generation with real token counts."""

    reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV was reused from an earlier request (prefix caching)


GenerationEvent = Chunk | Finished


def refuse_logprobs(request: InferenceRequest, engine: str) -> None:
    """Raise ``unsupported`` (param ``logprobs``) if ``request`` asks for log-probabilities ``engine`` cannot give."""
    if request.sampling.logprobs is not None:
        raise BusError(ErrorCode.UNSUPPORTED, f"the {engine} engine does not report log-probabilities; "
                       "use the transformers or vllm engine for 'logprobs'", param="logprobs")


def refuse_structured(request: InferenceRequest, engine: str) -> None:
    """Raise ``unsupported`` if ``request`` asks for structured output or ``logit_bias`` ``engine`` cannot enforce."""
    if request.structured is not None:
        raise BusError(ErrorCode.UNSUPPORTED, f"the {engine} engine cannot enforce structured outputs; use the "
                       "transformers, llama.cpp or vllm engine for 'response_format'", param="response_format")
    if request.sampling.logit_bias:
        raise BusError(ErrorCode.UNSUPPORTED, f"the {engine} engine does not apply 'logit_bias'; use the "
                       "transformers, llama.cpp or vllm engine", param="logit_bias")


def check_logit_bias(request: InferenceRequest, n_vocab: int) -> None:
    """Raise ``invalid_request`` if ``logit_bias`` names a token id outside the model's vocabulary."""
    for token in request.sampling.logit_bias:
        if token >= n_vocab:
            raise BusError(ErrorCode.INVALID_REQUEST, f"'logit_bias' names token {token}, but the model's "
                           f"vocabulary has {n_vocab} tokens", param="logit_bias")


@dataclass(slots=True)
class AdapterChange:
    """The engine's loaded PEFT adapters changed: the set now, and loads/evictions since the last change."""

    loaded: list[str]
    loads: int = 0
    evictions: int = 0


@dataclass(slots=True)
class PrefixCacheStats:
    """Prompt-prefix KV reuse of one backend: totals since it started, and the bytes it holds now."""

    hits: int = 0
    misses: int = 0
    reused_tokens: int = 0
    nbytes: int = 0


@dataclass
class JoinStats:
    """A model thread's join window (``backends/join_window.py``): totals since it started."""

    holds: int = 0  # steps held for replacements of finished requests
    joined: int = 0  # requests that came during a hold and started in the next step
    held_seconds: float = 0.0


class EngineBackend(abc.ABC):
    """A loaded engine serving one or more models."""

    #: Engine name reported in heartbeats (``transformers``, ``llama.cpp``, ``vllm``...).
    name: str = "abstract"
    #: Set by the service: called on the event loop whenever the loaded adapters change.
    adapter_listener: Callable[[AdapterChange], None] | None = None

    @abc.abstractmethod
    async def start(self) -> None:
        """Load models and start background workers; raise with a clear message on failure."""

    @abc.abstractmethod
    def generate(self, request: InferenceRequest) -> AsyncIterator[GenerationEvent]:
        """Stream the generation for ``request``; the last event is ``Finished``."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop ``request_id`` now and free its capacity; unknown ids are ignored."""

    @abc.abstractmethod
    async def check_health(self) -> None:
        """Raise if the engine cannot serve (worker thread dead, device lost)."""

    @abc.abstractmethod
    def served_models(self) -> list[ServedModel]:
        """Models loaded now, as advertised in heartbeats."""

    @property
    @abc.abstractmethod
    def slots(self) -> int:
        """How many requests the engine runs at once."""

    @property
    def device(self) -> str:
        """Where the model runs (``cpu``, ``cuda:0``...)."""
        return "cpu"

    def memory_bytes(self) -> int:
        """Memory used by the loaded models (device memory on GPU, process RSS on CPU)."""
        import psutil

        return psutil.Process().memory_info().rss

    async def close(self) -> None:
        """Release models and threads."""

    def bind_bus(self, js) -> None:
        """The JetStream context the engine may read the model registry and artifacts through."""

    async def check_adapter(self, adapter: str) -> None:
        """Raise ``BusError`` now if ``adapter`` cannot be served (unknown, another base, unsupported method)."""
        raise BusError(ErrorCode.UNSUPPORTED, f"the {self.name} engine does not serve adapters", param="adapter")

    def check_request(self, request: InferenceRequest) -> None:
        """Raise ``BusError`` (``unsupported``) before the dispatch is accepted if this engine cannot honour
        ``request``, so the scheduler offers it to another engine. By default: no structured outputs, no
        ``logit_bias``; engines that enforce them override this."""
        refuse_structured(request, self.name)

    def loaded_adapters(self) -> list[str]:
        """Adapter ids loaded now, as advertised in heartbeats."""
        return []

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        """The backend's own prompt-prefix KV cache, if it keeps one that it counts (for metrics)."""
        return None

    def join_stats(self) -> JoinStats | None:
        """The backend's join window, if its model thread holds steps for replacements (for metrics)."""
        return None

    def write_through(self, request_id: str, writer: ChunkWriter | None) -> bool:
        """Have ``request_id``'s chunks written by ``writer`` in the thread that makes them, before the loop
        sees them (``services/engine/replies.py``); None: no writer. False where no model thread of ours
        makes the chunks: they all come to the event loop, which sends them."""
        return False

    async def tokenize(self, request: InferenceRequest, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``request``'s prompt or messages, rendered exactly as ``generate`` renders them
        (``/tokenize``); engines without a tokenizer on our side say ``unsupported``."""
        raise BusError(ErrorCode.UNSUPPORTED, f"the {self.name} engine does not tokenize; use the "
                       "transformers, llama.cpp or vllm engine for /tokenize", param="model")

    async def detokenize(self, tokens: list[int]) -> str:
        """The text ``tokens`` stand for (``/detokenize``); ``unsupported`` where the engine has no tokenizer."""
        raise BusError(ErrorCode.UNSUPPORTED, f"the {self.name} engine does not detokenize; use the "
                       "transformers, llama.cpp or vllm engine for /detokenize", param="model")

    def context_length(self) -> int:
        """The longest sequence (prompt + answer) the first served model takes; 0 when unknown."""
        served = self.served_models()
        return served[0].context_length if served else 0
