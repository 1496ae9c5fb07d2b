"""The transformers engine: a Hugging Face causal LM on CPU or CUDA with continuous batching.

Requests are rendered with the model's chat template on the event loop (sub-millisecond, by the
shared ``text.prompt``), then generated in the model thread (``batching.BatchGenerator``); events
come back once per decode step through ``call_soon_threadsafe``. Structured outputs and
``logit_bias`` are enforced in the sampler, per row (``grammar``: the constraint is compiled here,
before the sequence is submitted). A request naming a PEFT adapter has its files
located and downloaded here (``lora.AdapterResolver``), then the model thread loads it. Prompt
prefixes prefilled lately are reused per adapter, within ``prefix_cache_bytes`` (``prefix_cache``).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Sequence as Seq
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from schemas.errors import BusError, ErrorCode
from schemas.heartbeat import ServedModel
from schemas.inference import InferenceRequest
from services.engine.backend import (ChunkWriter, EngineBackend, GenerationEvent, JoinStats, PrefixCacheStats,
                                     check_logit_bias)
from services.engine.prefix_cache import DEFAULT_PREFIX_CACHE_BYTES
from services.engine.grammar.compiler import EngineGrammars
from services.engine.backends.transformers.batching import BatchGenerator, Sequence
from services.engine.sampling import Nucleus
from services.engine.backends.join_window import DEFAULT_JOIN_WINDOW
from services.engine.backends.model_thread import EventQueues
from services.engine.text.detok import IncrementalDetokenizer, StopMatcher
from services.engine.text.prompt import HfTokenizing, RenderedPrompt, check_context, render_prompt
from services.engine.lora.sources import AdapterResolver, ThreadedAdapters

log = logging.getLogger(__name__)

#: Prompt KV kept for reuse (``--prefix-cache-bytes``): about 5,800 prompt tokens of the default model in fp32.


def pick_device(requested: str) -> torch.device:
    """``auto`` means CUDA when present, else CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """``auto`` means fp32 on CPU (fast and exact there), bf16 on CUDA when supported, else fp16."""
    if requested != "auto":
        return getattr(torch, requested)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class TransformersEngine(ThreadedAdapters, HfTokenizing, EngineBackend):
    """Serves one local model directory (safetensors + tokenizer) with transformers."""

    name = "transformers"

    def __init__(self, *, model_path: str | Path, model_id: str, aliases: Seq[str] = (), slots: int = 8,
                 device: str = "auto", dtype: str = "auto", context_length: int = 0, threads: int = 0,
                 adapter_dirs: Seq[str] = (), adapter_cache_dir: str | Path = "", max_adapters: int = 8,
                 prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
                 join_window: float = DEFAULT_JOIN_WINDOW) -> None:
        self._path = Path(model_path)
        self._prefix_cache_bytes = prefix_cache_bytes
        self._join_window = join_window
        self._model_id = model_id
        self._aliases = list(aliases)
        self._slots = slots
        self._device = pick_device(device)
        self._dtype = pick_dtype(dtype, self._device)
        self._context_length = context_length
        self._threads = threads
        self._events = EventQueues()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._batcher: BatchGenerator | None = None
        self.tokenizer = None
        self.model = None
        self._grammars: EngineGrammars | None = None
        self._max_adapters = max_adapters
        self._init_adapters(AdapterResolver(adapter_dirs=adapter_dirs, base_names=[model_id, *self._aliases],
                                            cache_dir=adapter_cache_dir or self._path.parent.parent / "adapters"))

    # --- lifecycle ---
    async def start(self) -> None:
        """Load tokenizer and model in a worker thread, then start the model thread."""
        if not (self._path / "config.json").exists():
            raise FileNotFoundError(f"no model at {self._path} (expected a transformers directory with config.json)")
        await asyncio.to_thread(self._load)
        self._loop = asyncio.get_running_loop()
        self._events.bind(self._loop)
        self._batcher = BatchGenerator(self.model, self._eos_ids(), self._device, self._slots, self._events.deliver,
                                       max_adapters=self._max_adapters, on_adapters=self._adapters_changed,
                                       prefix_cache_bytes=self._prefix_cache_bytes, join_window=self._join_window)
        self._batcher.start()
        self._grammars = EngineGrammars(self._grammar_tokenizer, self._n_vocab())
        log.info("loaded %s from %s on %s (%s), %d slots, context %d", self._model_id, self._path, self._device,
                 self._dtype, self._slots, self._context_length)

    def _load(self) -> None:
        if self._threads:
            torch.set_num_threads(self._threads)  # process-wide: one engine process serves its models
        self.tokenizer = AutoTokenizer.from_pretrained(self._path)
        model = AutoModelForCausalLM.from_pretrained(self._path, dtype=self._dtype, attn_implementation="sdpa")
        self.model = model.to(self._device).eval()
        if not self._context_length:
            self._context_length = int(getattr(model.config, "max_position_embeddings", 0) or 2048)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for value in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif value:
                ids.update(value)
        return ids

    def _n_vocab(self) -> int:
        """Rows of the model's logits (the tokenizer's vocabulary may be smaller: padding rows)."""
        return int(self.model.get_output_embeddings().weight.shape[0])

    def _grammar_tokenizer(self):
        import llguidance.hf

        return llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self._n_vocab(), eos_token=sorted(self._eos_ids()))

    def check_request(self, request: InferenceRequest) -> None:
        """Structured outputs and ``logit_bias`` are enforced here; only token ids outside the vocabulary are refused."""
        if self.model is not None:
            check_logit_bias(request, self._n_vocab())

    async def close(self) -> None:
        """Stop the model thread and release the model."""
        if self._batcher is not None:
            self._batcher.stop()
            await asyncio.to_thread(self._batcher.join, 10)
        # Drop every reference to the weights (the batcher holds the model too), so an unload frees them.
        self._batcher = None
        self.model = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    async def check_health(self) -> None:
        """The model thread must be alive."""
        if self._batcher is None or not self._batcher.is_alive():
            raise BusError(ErrorCode.ENGINE_FAILED, "the transformers model thread is not running")

    # --- what we serve ---
    @property
    def slots(self) -> int:
        """Sequences decoded together in one batch."""
        return self._slots

    @property
    def device(self) -> str:
        """``cpu`` or ``cuda:N``."""
        return str(self._device)

    def served_models(self) -> list[ServedModel]:
        """The one model this engine holds."""
        return [ServedModel(id=self._model_id, context_length=self._context_length, aliases=self._aliases)]

    def memory_bytes(self) -> int:
        """CUDA memory allocated by torch on GPU; process RSS on CPU."""
        if self._device.type == "cuda":
            return int(torch.cuda.memory_allocated(self._device))
        return super().memory_bytes()

    def join_stats(self) -> JoinStats | None:
        return None if self._batcher is None else self._batcher.join_stats()

    def write_through(self, request_id: str, writer: ChunkWriter | None) -> bool:
        self._events.write_through(request_id, writer)
        return True

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        """Reuse so far (hits, reused prompt tokens) and the bytes held; read from the loop, written by the model thread."""
        if self._batcher is None:
            return None
        cache = self._batcher.prefix
        return PrefixCacheStats(hits=cache.hits, misses=cache.misses, reused_tokens=cache.reused_tokens,
                                nbytes=cache.nbytes)

    # --- generation ---
    def render(self, request: InferenceRequest) -> RenderedPrompt:
        """Token ids the model sees: the chat template for messages, the raw prompt for completions.

        A migrated request's ``continuation`` (the answer so far) follows, so the model carries on
        the assistant's turn, or the completion, from where the lost engine stopped.
        """
        return render_prompt(self.tokenizer, request)

    def _new_sequence(self, request: InferenceRequest, prompt_ids: list[int], adapter_path: Path | None,
                      constraint=None) -> Sequence:
        params = request.sampling
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        draw = Nucleus(params.temperature, params.top_p, seed) if params.temperature > 0 else None
        return Sequence(
            request_id=request.id,
            prompt_ids=prompt_ids,
            params=params,
            max_new_tokens=min(params.max_tokens, self._context_length - len(prompt_ids)),
            detok=IncrementalDetokenizer(lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)),
            stop=StopMatcher(params.stop),
            draw=draw,
            adapter=request.adapter if adapter_path is not None else None,
            adapter_path=adapter_path,
            token_text=lambda token: self.tokenizer.decode([token]),
            constraint=constraint,
        )

    async def generate(self, request: InferenceRequest) -> AsyncIterator[GenerationEvent]:
        """Stream ``request``; events arrive from the model thread as tokens are sampled."""
        if self._batcher is None:
            raise BusError(ErrorCode.ENGINE_FAILED, "engine not started")
        prompt = self.render(request)
        check_context(len(prompt.ids), self._context_length)

        check_logit_bias(request, self._n_vocab())
        constraint = await self._grammars.constraint(request.structured)
        if constraint is not None and request.continuation:  # a migrated answer resumes mid-grammar
            constraint.advance_all(self.tokenizer(request.continuation, add_special_tokens=False).input_ids)

        async def submit() -> None:
            adapter_path = await self._adapters.fetch(request.adapter) if request.adapter else None
            self._batcher.submit(self._new_sequence(request, prompt.ids, adapter_path, constraint))

        async for event in self._events.follow(request.id, submit, self._abort_sequence, prompt.continued):
            yield event

    def _abort_sequence(self, request_id: str) -> None:
        if self._batcher is not None:
            self._batcher.abort(request_id)

    async def abort(self, request_id: str) -> None:
        """Drop the sequence at the next step; its stream ends with ``cancelled``."""
        self._abort_sequence(request_id)
        self._events.cancel(request_id)
