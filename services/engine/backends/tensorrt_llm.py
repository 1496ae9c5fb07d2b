"""The TensorRT-LLM engine: NVIDIA's ``tensorrt_llm.LLM`` (its PyTorch backend by default) on CUDA GPUs.

Written against TensorRT-LLM's current LLM API, checked in its sources: ``tensorrt_llm/llmapi/llm.py``
(``LLM(model=..., max_batch_size=..., max_seq_len=..., lora_config=...)``,
``LLM.generate_async(inputs, sampling_params=, lora_request=, streaming=True)`` returning a
``RequestOutput`` that is async-iterable and has ``abort()``), ``tensorrt_llm/sampling_params.py``
(``SamplingParams`` fields; all of temperature/top_p/top_k unset, ``top_k == 1`` or
``temperature == 0`` mean greedy; an unset ``seed`` is the runtime's fixed default 0),
``tensorrt_llm/executor/result.py`` (``CompletionOutput.text_diff``/``token_ids_diff``/
``finish_reason`` in ``stop|length|timeout|cancelled``) and the LoRA guide
(``tensorrt_llm.lora_manager.LoraConfig``, ``tensorrt_llm.executor.request.LoRARequest``).

NOT RUN HERE: this repository's machines and CI have no NVIDIA GPU and no ``tensorrt_llm``. Only
the pure parts below (parameter mapping, output translation, error mapping) and the lifecycle
errors are tested (tests/engine/test_engine_gpu_backends.py), against a clearly named test double.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Sequence as Seq
from pathlib import Path

from schemas.errors import BusError, ErrorCode
from schemas.heartbeat import ServedModel
from schemas.inference import InferenceRequest, SamplingParams
from services.engine.backend import AdapterChange, EngineBackend, Finished, GenerationEvent, refuse_logprobs
from services.common.model_store import default_state_dir
from services.engine.backends.library import import_library
from services.engine.lora.sources import AdapterResolver, read_adapter_config
from services.engine.text.prompt import check_context, config_context_length, render_prompt
from services.engine.text.deltas import TextStream

log = logging.getLogger(__name__)

ENGINE = "tensorrt-llm"
INSTALL = "pip install tensorrt-llm (Linux x86_64/aarch64 with an NVIDIA GPU and CUDA; see docs/engines.md)"
DEFAULT_LORA_RANK = 64


def sampling_kwargs(params: SamplingParams, max_tokens: int, *, rng: random.Random | None = None) -> dict:
    """``tensorrt_llm.SamplingParams`` keyword arguments for our ``SamplingParams``.

    Greedy (our temperature 0) is ``top_k=1`` with temperature/top_p unset, which every version
    reads as greedy. Our "no seed" means a fresh random seed; TensorRT-LLM's unset seed is a fixed
    0, so a random one is drawn. Neutral penalties and disabled top-k/top-p are left unset.
    """
    kwargs: dict = {"max_tokens": max_tokens, "n": 1, "detokenize": True, "skip_special_tokens": True}
    if params.temperature <= 0.0:
        kwargs["top_k"] = 1
    else:
        kwargs["temperature"] = params.temperature
        if params.top_p < 1.0:
            kwargs["top_p"] = params.top_p
        if params.top_k > 0:
            kwargs["top_k"] = params.top_k
    kwargs["seed"] = params.seed if params.seed is not None else (rng or random).getrandbits(63)
    if params.stop:
        kwargs["stop"] = list(params.stop)
    if params.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = params.repetition_penalty
    if params.presence_penalty:
        kwargs["presence_penalty"] = params.presence_penalty
    if params.frequency_penalty:
        kwargs["frequency_penalty"] = params.frequency_penalty
    return kwargs


def llm_kwargs(model_path: str | Path, *, slots: int, context_length: int, dtype: str) -> dict:
    """``tensorrt_llm.LLM`` keyword arguments (the LoRA config object is added by the caller)."""
    kwargs: dict = {"model": str(model_path), "max_batch_size": slots, "dtype": dtype}
    if context_length:
        kwargs["max_seq_len"] = context_length
    return kwargs


def output_events(completion, stream: TextStream, prompt_tokens: int) -> list[GenerationEvent]:
    """One streamed ``CompletionOutput`` as our events: its text delta, and ``Finished`` when it ended.

    Our stop matcher runs over the deltas too, so a stop string never leaks even in part; when it
    fires first the request is reported finished with ``stop`` (the caller aborts it in the engine).
    """
    events: list[GenerationEvent] = []
    chunk = stream.push(completion.text_diff, completion.token_ids_diff)
    if chunk is not None:
        events.append(chunk)
    reason = "stop" if stream.stopped else completion.finish_reason
    if reason is None:
        return events
    if reason == "cancelled":
        raise BusError(ErrorCode.CANCELLED, "request aborted")
    if reason == "timeout":
        raise BusError(ErrorCode.TIMEOUT, "TensorRT-LLM timed the request out")
    # TensorRT-LLM matched a stop string itself: its final text has it trimmed (``stop_reason`` is
    # the string), so text we held back as a possible stop string beginning is not output.
    trimmed = isinstance(getattr(completion, "stop_reason", None), str)
    tail = stream.finish(len(completion.text) if trimmed else None)
    if tail is not None:
        events.append(tail)
    events.append(Finished(reason if reason == "length" else "stop", prompt_tokens, len(completion.token_ids)))
    return events


def map_error(exc: BaseException) -> BusError:
    """A TensorRT-LLM exception as a typed error (by message and class name: the library is not imported here)."""
    text = str(exc)
    if isinstance(exc, ValueError) and ("should not exceed" in text or "max_seq_len" in text
                                        or "max_num_tokens" in text):
        return BusError(ErrorCode.CONTEXT_LENGTH_EXCEEDED, f"TensorRT-LLM refused the prompt: {text}",
                        param="messages")
    if isinstance(exc, (ValueError, TypeError)):
        return BusError(ErrorCode.INVALID_REQUEST, f"TensorRT-LLM refused the request: {text}")
    if "shutting down" in text or "shutdown" in text:
        return BusError(ErrorCode.ENGINE_FAILED, f"TensorRT-LLM is shutting down: {text}")
    return BusError(ErrorCode.ENGINE_FAILED, f"TensorRT-LLM failed: {type(exc).__name__}: {text}")


class TensorRTLLMEngine(EngineBackend):
    """Serves one Hugging Face checkpoint (or a built engine directory) with ``tensorrt_llm.LLM``."""

    name = ENGINE

    def __init__(self, *, model_path: str | Path, model_id: str, aliases: Seq[str] = (), slots: int = 8,
                 device: str = "auto", dtype: str = "auto", context_length: int = 0,
                 adapter_dirs: Seq[str] = (), adapter_cache_dir: str | Path = "", max_adapters: int = 8) -> None:
        self._path = Path(model_path)
        self._model_id = model_id
        self._aliases = list(aliases)
        self._slots = slots
        self._device = "cuda" if device == "auto" else device
        self._dtype = dtype
        self._context_length = context_length
        self._max_adapters = max_adapters
        # LoRA costs device memory reserved up front, so it is on only when adapters are configured.
        self._lora_enabled = bool(adapter_dirs)
        self._adapters = AdapterResolver(adapter_dirs=adapter_dirs, base_names=[model_id, *self._aliases],
                                         cache_dir=adapter_cache_dir or self._path.parent / "adapters")
        self._lora_ids: dict[str, int] = {}
        self._running: dict[str, object] = {}
        self._lib = None
        self._llm = None
        self.tokenizer = None

    @classmethod
    def from_config(cls, cfg) -> TensorRTLLMEngine:
        """Build from the engine's ``EngineConfig``."""
        return cls(model_path=cfg.model_path, model_id=cfg.model_id, aliases=cfg.aliases, slots=cfg.slots,
                   device=cfg.device, dtype=cfg.dtype, context_length=cfg.context_length,
                   adapter_dirs=cfg.adapter_dirs,
                   adapter_cache_dir=cfg.adapter_cache_dir or default_state_dir() / "adapters",
                   max_adapters=cfg.max_adapters)

    # --- lifecycle ---
    async def start(self) -> None:
        """Import tensorrt_llm (a clear error if missing), then build the LLM in a worker thread."""
        self._lib = import_library("tensorrt_llm", engine=ENGINE, install=INSTALL)
        if not self._path.exists():
            raise FileNotFoundError(f"no model at {self._path} (expected a Hugging Face checkpoint directory "
                                    "or a TensorRT-LLM engine directory)")
        transformers = import_library("transformers", engine=ENGINE, install="pip install transformers")
        self.tokenizer = await asyncio.to_thread(transformers.AutoTokenizer.from_pretrained, self._path)
        kwargs = llm_kwargs(self._path, slots=self._slots, context_length=self._context_length, dtype=self._dtype)
        if self._lora_enabled:
            lora_manager = import_library("tensorrt_llm.lora_manager", engine=ENGINE, install=INSTALL)
            kwargs["lora_config"] = lora_manager.LoraConfig(max_lora_rank=DEFAULT_LORA_RANK,
                                                            max_loras=self._max_adapters,
                                                            max_cpu_loras=self._max_adapters)
        self._llm = await asyncio.to_thread(lambda: self._lib.LLM(**kwargs))
        if not self._context_length:
            self._context_length = (int(getattr(getattr(self._llm, "args", None), "max_seq_len", 0) or 0)
                                    or config_context_length(self._path) or 2048)
        log.info("TensorRT-LLM loaded %s from %s, %d slots, context %d, LoRA %s", self._model_id, self._path,
                 self._slots, self._context_length, "on" if self._lora_enabled else "off")

    async def close(self) -> None:
        """Abort what runs and shut the LLM's executor down."""
        for result in list(self._running.values()):
            result.abort()
        if self._llm is not None:
            await asyncio.to_thread(self._llm.shutdown)
            self._llm = None

    async def check_health(self) -> None:
        """The LLM exists and its executor is not shut down."""
        if self._llm is None:
            raise BusError(ErrorCode.ENGINE_FAILED, "the TensorRT-LLM engine is not started")
        # ``_executor`` is the LLM's own handle (llm.py checks it the same way before each request).
        executor = getattr(self._llm, "_executor", None)
        if executor is None or executor.is_shutdown():
            raise BusError(ErrorCode.ENGINE_FAILED, "the TensorRT-LLM executor is shut down")

    # --- what we serve ---
    @property
    def slots(self) -> int:
        """``max_batch_size`` of the LLM."""
        return self._slots

    @property
    def device(self) -> str:
        """``cuda`` unless a device was named."""
        return self._device

    def served_models(self) -> list[ServedModel]:
        """The one model this engine holds."""
        return [ServedModel(id=self._model_id, context_length=self._context_length, aliases=self._aliases)]

    def memory_bytes(self) -> int:
        """Device memory in use (TensorRT-LLM allocates outside torch's allocator, so torch's count misses it)."""
        try:
            import torch

            free, total = torch.cuda.mem_get_info()
            return int(total - free)
        except (ImportError, RuntimeError):
            return super().memory_bytes()

    # --- adapters ---
    def bind_bus(self, js) -> None:
        """Resolve adapters through the model registry and the artifact store too."""
        self._adapters.bind(js)

    async def check_adapter(self, adapter: str) -> None:
        """LoRA must be on (``--adapter-dir``) and the adapter known for this base model."""
        if not self._lora_enabled:
            raise BusError(ErrorCode.UNSUPPORTED, "this TensorRT-LLM engine was started without LoRA "
                                                  "(give --adapter-dir to enable it)", param="adapter")
        await self._adapters.locate(adapter)

    def loaded_adapters(self) -> list[str]:
        """Adapters sent to the engine lately (TensorRT-LLM keeps up to ``max_adapters`` on the GPU)."""
        return list(self._lora_ids)[-self._max_adapters:]

    async def _lora_request(self, adapter: str):
        await self.check_adapter(adapter)
        path = await self._adapters.fetch(adapter)
        peft_type = read_adapter_config(path, adapter)["peft_type"]
        if peft_type != "LORA":
            raise BusError(ErrorCode.UNSUPPORTED, f"adapter {adapter!r} uses {peft_type}; TensorRT-LLM serves "
                                                  "only LoRA adapters", param="adapter")
        if adapter not in self._lora_ids:
            self._lora_ids[adapter] = len(self._lora_ids) + 1
            if self.adapter_listener is not None:
                self.adapter_listener(AdapterChange(self.loaded_adapters(), loads=1))
        request_mod = import_library("tensorrt_llm.executor.request", engine=ENGINE, install=INSTALL)
        return request_mod.LoRARequest(adapter, self._lora_ids[adapter], str(path))

    # --- generation ---
    async def generate(self, request: InferenceRequest) -> AsyncIterator[GenerationEvent]:
        """Stream ``request`` through ``LLM.generate_async(..., streaming=True)``."""
        if self._llm is None:
            raise BusError(ErrorCode.ENGINE_FAILED, "engine not started")
        refuse_logprobs(request, "tensorrt-llm")
        rendered = render_prompt(self.tokenizer, request)
        check_context(len(rendered.ids), self._context_length)
        lora = await self._lora_request(request.adapter) if request.adapter else None
        max_tokens = min(request.sampling.max_tokens, self._context_length - len(rendered.ids))
        try:
            params = self._lib.SamplingParams(**sampling_kwargs(request.sampling, max_tokens))
            result = self._llm.generate_async(rendered.ids, sampling_params=params, streaming=True,
                                              lora_request=lora)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise map_error(exc) from exc
        self._running[request.id] = result
        stream = TextStream(request.sampling.stop)
        try:
            async for output in result:
                for event in output_events(output.outputs[0], stream, rendered.billed):
                    yield event
                    if isinstance(event, Finished):
                        return
        except RuntimeError as exc:  # tensorrt_llm's RequestError is a RuntimeError
            raise map_error(exc) from exc
        finally:
            self._running.pop(request.id, None)
            if not result.finished:  # our stop string, an abort, or the consumer went away
                result.abort()

    async def abort(self, request_id: str) -> None:
        """Abort in the engine; its stream then ends with ``cancelled``, raised as a ``CANCELLED`` error."""
        result = self._running.get(request_id)
        if result is not None:
            result.abort()
