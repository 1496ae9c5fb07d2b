"""The models one engine process holds: one ``EngineBackend`` per model, loaded and unloaded at run time.

Every model is a backend instance of this process's engine kind, built by the same factory
that built the first one (``services.engine.__main__.build_backend``) from a copy of the
config naming the model's id, path and aliases. Loads are serialized (memory is measured
around each one); concurrent loads of one model share one. A load that would exceed
``max_models`` or ``memory_budget`` first unloads the least recently used idle models
(``eviction.plan_evictions``); a model with requests in flight is never unloaded by eviction,
and an explicit unload waits for them (up to the drain timeout). Unloading really returns
memory: the backend is closed and dropped, then the garbage collector, the CUDA cache and
glibc's heap (``malloc_trim``) give the freed pages back.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from operator import methodcaller
from pathlib import Path

import msgspec
from nats.js import JetStreamContext

from schemas.errors import BusError, ErrorCode
from schemas.heartbeat import ServedModel
from schemas.registry import ModelEntry
from services.common import gc_heap, model_registry
from services.engine.backend import AdapterChange, EngineBackend, JoinStats, PrefixCacheStats
from services.engine.config import EngineConfig
from services.engine.eviction import ModelUsage, NoRoom, plan_evictions

log = logging.getLogger(__name__)

BackendFactory = Callable[[EngineConfig], EngineBackend]


@dataclass
class HostedModel:
    """One loaded model: its backend, what it took in memory, and how it is being used."""

    id: str
    backend: EngineBackend
    memory_bytes: int
    last_used: float
    in_flight: int = 0
    unloading: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def names(self) -> set[str]:
        """Every id and alias the backend serves."""
        out = {self.id}
        for m in self.backend.served_models():
            out.add(m.id)
            out.update(m.aliases)
        return out


@dataclass(frozen=True)
class LoadResult:
    """What a load did: the model's id, the idle models evicted for it, and how long it took (0: already loaded)."""

    model: str
    evicted: list[str]
    seconds: float = 0.0


def process_memory(device: str) -> int:
    """Model memory of this process: torch's allocations on a CUDA device, else the resident set size."""
    torch = sys.modules.get("torch")
    if device.startswith("cuda") and torch is not None:
        return int(torch.cuda.memory_allocated(torch.device(device)))
    import psutil

    return psutil.Process().memory_info().rss


def release_memory() -> None:
    """Give freed memory back: collect cycles (frozen ones too), empty the CUDA cache, trim glibc's heap."""
    gc_heap.release()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
    libc_name = ctypes.util.find_library("c")
    if libc_name and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # musl has no malloc_trim
            ctypes.CDLL(libc_name).malloc_trim(0)


class ModelHost:
    """The backends of one engine process, keyed by model id (see the module docstring)."""

    def __init__(self, config: EngineConfig, primary: EngineBackend, factory: BackendFactory | None = None, *,
                 state_dir: Path, on_change: Callable[[], None] = lambda: None,
                 on_adapters: Callable[[AdapterChange], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = config
        self.name = primary.name
        self.device = primary.device
        self.slots = primary.slots
        self._primary = primary
        self._factory = factory
        self._state_dir = state_dir
        self._on_change = on_change
        self._on_adapters = on_adapters
        self._clock = clock
        self._measure = lambda: process_memory(self.device)  # never through a backend: it may be unloaded
        self._models: dict[str, HostedModel] = {}
        self._lock = asyncio.Lock()
        self._loading: dict[str, asyncio.Future[LoadResult]] = {}
        self._js: JetStreamContext | None = None

    # --- lifecycle ---
    async def start(self) -> None:
        """Load the first model (the one named on the command line)."""
        path = Path(self.cfg.model_path) if self.cfg.model_path else None
        need = await asyncio.to_thread(model_registry.weights_bytes, path) if path is not None else 0
        await self._start_backend(self._primary, self.cfg.model_id, path, need)

    async def close(self) -> None:
        """Close every backend."""
        for model in list(self._models.values()):
            await model.backend.close()
        self._models.clear()

    def bind_bus(self, js: JetStreamContext) -> None:
        """Registry and object store access, for loads and for every backend's own PEFT adapters."""
        self._js = js
        for model in self._models.values():
            model.backend.bind_bus(js)

    # --- what is served ---
    def route(self, name: str) -> HostedModel | None:
        """The model called ``name`` (id or alias) if it is loaded and not being unloaded."""
        for model in self._models.values():
            if not model.unloading and name in model.names():
                return model
        return None

    def begin(self, model: HostedModel) -> None:
        """A request starts on ``model`` (call right after ``route``, before any await)."""
        model.in_flight += 1
        model.last_used = self._clock()
        model.idle.clear()

    def end(self, model: HostedModel) -> None:
        """A request on ``model`` is over."""
        model.in_flight = max(0, model.in_flight - 1)
        model.last_used = self._clock()
        if model.in_flight == 0:
            model.idle.set()

    def served_id(self, name: str) -> str | None:
        """The id of the served model that ``name`` is (its id or one of its aliases), or ``None``."""
        for m in self.served_models():
            if m.id == name or name in m.aliases:
                return m.id
        return None

    def served_models(self) -> list[ServedModel]:
        """Every model served now, with its memory, load and PEFT adapters."""
        out = []
        for model in self._models.values():
            if model.unloading:
                continue
            adapters = model.backend.loaded_adapters()
            for served in model.backend.served_models():
                out.append(msgspec.structs.replace(served, memory_bytes=model.memory_bytes,
                                                   in_flight=model.in_flight, adapters=adapters))
        return out

    def backends(self) -> list[tuple[str, EngineBackend]]:
        """Every loaded model's id and backend, those being unloaded left out (their health checks)."""
        return [(model.id, model.backend) for model in self._models.values() if not model.unloading]

    def loaded_adapters(self) -> list[str]:
        """PEFT adapters loaded in any model."""
        return [a for model in self._models.values() for a in model.backend.loaded_adapters()]

    def memory_bytes(self) -> int:
        """The engine's model memory now: this process's, or more where a backend counts its own
        processes too (vLLM keeps weights and KV cache in child processes)."""
        return max([self._measure(), *(m.backend.memory_bytes() for m in self._models.values())])

    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Prompt-prefix reuse summed over the loaded backends (an unloaded model's counts go with it)."""
        return self._summed(PrefixCacheStats, methodcaller("prefix_cache_stats"))

    def join_stats(self) -> JoinStats:
        """Join-window totals summed over the loaded backends (likewise)."""
        return self._summed(JoinStats, methodcaller("join_stats"))

    def _summed(self, kind, read):
        """``kind()`` with every field the sum of that field over what ``read(backend)`` returns (None: nothing)."""
        total = kind()
        for model in self._models.values():
            stats = read(model.backend)
            if stats is not None:
                for f in fields(kind):
                    setattr(total, f.name, getattr(total, f.name) + getattr(stats, f.name))
        return total

    def __len__(self) -> int:
        return len(self._models)

    # --- load ---
    async def load(self, name: str) -> LoadResult:
        """Load the registry model ``name`` (a no-op if served); concurrent loads of one model share one."""
        if (served := self.route(name)) is not None:
            return LoadResult(served.id, [])
        if self._factory is None:
            raise BusError(ErrorCode.UNSUPPORTED, "this engine was started without a way to load models at run time")
        if self._js is None:
            raise BusError(ErrorCode.UNAVAILABLE, "the engine is not connected to the model registry")
        entry = await model_registry.lookup(self._js, name)
        if entry is None:
            raise BusError(ErrorCode.MODEL_NOT_FOUND, f"model {name!r} is not in the model registry "
                                                      "(register it with ./cy model register)", param="model")
        if not model_registry.engine_can_serve(self.name, entry):
            raise BusError(ErrorCode.UNSUPPORTED, f"model {entry.id!r} ({entry.format}, engine "
                                                  f"{entry.engine or 'any'}) cannot be served by the {self.name} "
                                                  "engine", param="model")
        pending = self._loading.get(entry.id)
        if pending is None:
            pending = asyncio.ensure_future(self._load_entry(entry))
            self._loading[entry.id] = pending
            pending.add_done_callback(lambda _: self._loading.pop(entry.id, None))
        return await asyncio.shield(pending)

    async def _load_entry(self, entry: ModelEntry) -> LoadResult:
        async with self._lock:
            if (served := self.route(entry.id)) is not None:
                return LoadResult(served.id, [])
            path = await model_registry.fetch_source(entry, self.name, self._state_dir, self._js)
            need = await asyncio.to_thread(model_registry.weights_bytes, path)
            evicted = await self._make_room(need)
            cfg = msgspec.structs.replace(self.cfg, model_id=entry.id, model_path=str(path),
                                          aliases=list(entry.aliases), context_length=entry.context_length)
            began = time.monotonic()
            try:
                backend = self._factory(cfg)
            except (ValueError, RuntimeError, TypeError) as exc:
                raise BusError(ErrorCode.ENGINE_FAILED, f"cannot build a {self.name} engine for {entry.id!r}: {exc}") \
                    from None
            if self._js is not None:
                backend.bind_bus(self._js)
            await self._start_backend(backend, entry.id, path, need)
            return LoadResult(entry.id, evicted, time.monotonic() - began)

    async def _start_backend(self, backend: EngineBackend, model_id: str, path: Path | None, need: int) -> None:
        """Start ``backend`` and record the memory it took; a failure is ``engine_failed`` naming the cause.

        On CPU the weights are often memory-mapped from their files and count in the resident set
        only once touched, so the model's size is at least its weight files there.
        """
        before = self._measure()
        try:
            with gc_heap.paused():  # the model's objects all stay: collections during the load free nothing
                await backend.start()
        except Exception as exc:  # loading runs arbitrary model code: any failure must become a typed error
            log.warning("loading %s from %s failed", model_id, path, exc_info=True)
            with contextlib.suppress(Exception):
                await backend.close()
            del backend
            await asyncio.to_thread(release_memory)
            code = ErrorCode.MODEL_NOT_FOUND if isinstance(exc, FileNotFoundError) else ErrorCode.ENGINE_FAILED
            raise BusError(code, f"loading model {model_id!r} from {path or self.cfg.model_path} failed: "
                                 f"{type(exc).__name__}: {exc}", param="model") from None
        if self._on_adapters is not None:
            backend.adapter_listener = self._on_adapters
        served = backend.served_models()
        key = served[0].id if served else model_id
        took = max(0, self._measure() - before)
        model = HostedModel(id=key, backend=backend, last_used=self._clock(),
                            memory_bytes=took if self.device.startswith("cuda") else max(took, need))
        model.idle.set()
        self._models[key] = model
        log.info("model %s loaded (%.1f MiB); serving %s", key, model.memory_bytes / 2**20, sorted(self._models))
        gc_heap.freeze(f"loading {key}")  # the model lives until it is dropped (then ``release_memory``)
        self._on_change()

    async def _make_room(self, need: int) -> list[str]:
        usage = [ModelUsage(m.id, m.last_used, m.in_flight, m.memory_bytes) for m in self._models.values()]
        try:
            victims = plan_evictions(usage, max_models=self.cfg.max_models, budget=self.cfg.memory_budget,
                                     used_bytes=self._measure() if self.cfg.memory_budget else 0, need_bytes=need)
        except NoRoom as exc:
            raise BusError(ErrorCode.ENGINE_BUSY, f"no room for another model on this engine: {exc}") from None
        for model_id in victims:
            self._models[model_id].unloading = True  # no await since planning: none of them got a request
        for model_id in victims:
            log.info("evicting idle model %s (least recently used) to make room", model_id)
            await self._drop(model_id)
        return victims

    # --- unload ---
    async def unload(self, name: str, timeout: float) -> str:
        """Unload ``name`` once its requests in flight end (``conflict`` if they outlast ``timeout``); its id."""
        model = self.route(name)
        if model is None:
            raise BusError(ErrorCode.MODEL_NOT_FOUND, f"model {name!r} is not loaded on this engine", param="model")
        async with self._lock:
            if model.id not in self._models or model.unloading:
                return model.id
            model.unloading = True  # new requests are refused from now on
            self._on_change()
            try:
                async with asyncio.timeout(timeout):
                    await model.idle.wait()
            except TimeoutError:
                model.unloading = False
                self._on_change()
                raise BusError(ErrorCode.CONFLICT, f"model {model.id!r} still has {model.in_flight} request(s) in "
                                                   f"flight after {timeout:.0f}s; not unloaded") from None
            await self._drop(model.id)
        return model.id

    async def _drop(self, model_id: str) -> None:
        model = self._models.pop(model_id)
        await model.backend.close()
        if model.backend is self._primary:
            self._primary = None
        del model
        await asyncio.to_thread(release_memory)
        log.info("model %s unloaded; serving %s", model_id, sorted(self._models))
        self._on_change()
