"""Where a PEFT adapter's files come from: ``--adapter-dir`` directories, else the model registry.

An adapter id resolves, in order, to ``<adapter dir>/<id>`` (a directory holding
``adapter_config.json``) for each ``--adapter-dir``, then to the ``llm_models`` registry entry
``names.slug(id)`` (kind ``adapter``) whose ``source`` is ``artifact:<object>`` in the object
store ``llm_artifacts``; that tar is downloaded and unpacked into the engine's cache directory
once and reused afterwards. ``locate`` is the cheap check done before a dispatch is accepted
(an unknown adapter is refused at once); ``fetch`` returns the local directory, downloading if
needed. Only prompt-free adapters (LoRA and the other layer-modifying PEFT methods) are
served: prompt/prefix tuning change the model's inputs and are refused as ``unsupported``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tarfile
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
import nats.js.errors
from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from schemas import names
from schemas.errors import BusError, ErrorCode
from schemas.registry import ADAPTER, ModelEntry
from services.common import artifacts
from services.common.model_ref import check_adapter_id
from services.engine.backend import AdapterChange

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ARTIFACT_SOURCE = "artifact:"

# peft task types of methods that rewrite the model's inputs (virtual tokens / past key values):
# they cannot share a batch with other rows, so this engine refuses them (``unsupported``, and the scheduler tries another engine).
PROMPT_LEARNING_TYPES = frozenset({"PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING",
                                   "CPT", "ADAPTION_PROMPT"})


@dataclass(frozen=True)
class AdapterRef:
    """A located adapter: a local directory, or a registry entry still to download."""

    id: str
    path: Path | None = None
    entry: ModelEntry | None = None


def read_adapter_config(path: Path, adapter: str) -> dict:
    """The adapter's ``adapter_config.json``; a missing/bad file or a prompt-learning method is a typed error."""
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise BusError(ErrorCode.INVALID_REQUEST, f"adapter {adapter!r} is broken: cannot read {ADAPTER_CONFIG}: "
                                                  f"{exc}", param="adapter") from None
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        raise BusError(ErrorCode.INVALID_REQUEST, f"adapter {adapter!r} is broken: {ADAPTER_CONFIG} has no "
                                                  "'peft_type'", param="adapter")
    if config["peft_type"] in PROMPT_LEARNING_TYPES:
        raise BusError(ErrorCode.UNSUPPORTED, f"adapter {adapter!r} uses {config['peft_type']}, which changes the "
                                              "model's inputs; this engine serves only layer adapters (LoRA, DoRA, "
                                              "AdaLoRA, IA3, LoHa, LoKr, VeRA, FourierFT...)", param="adapter")
    return config


class AdapterResolver:
    """Turns adapter ids into local adapter directories for one engine (see the module docstring)."""

    def __init__(self, *, adapter_dirs: Sequence[str | Path] = (), cache_dir: str | Path,
                 base_names: Collection[str] = ()) -> None:
        self._dirs = [Path(d) for d in adapter_dirs]
        self._cache = Path(cache_dir)
        self._bases = set(base_names)
        self._js: JetStreamContext | None = None
        self._fetching: dict[str, asyncio.Future[Path]] = {}

    def bind(self, js: JetStreamContext) -> None:
        """Use ``js`` for the registry and the object store (without it only ``--adapter-dir`` is searched)."""
        self._js = js

    def local(self, adapter: str) -> Path | None:
        """The first ``--adapter-dir`` subdirectory named ``adapter`` that holds an adapter config."""
        for root in self._dirs:
            path = root / adapter
            if (path / ADAPTER_CONFIG).is_file():
                return path
        return None

    def _cached(self, adapter: str) -> Path:
        return self._cache / names.slug(adapter)

    async def locate(self, adapter: str) -> AdapterRef:
        """Where ``adapter`` is, or ``model_not_found``; a registry entry for another base is ``invalid_request``."""
        check_adapter_id(adapter)
        if (path := self.local(adapter)) is not None:
            return AdapterRef(adapter, path=path)
        entry = await self._registry_entry(adapter)
        if entry is None or entry.kind != ADAPTER:
            where = ", ".join(str(d) for d in self._dirs) or "no --adapter-dir"
            raise BusError(ErrorCode.MODEL_NOT_FOUND, f"adapter {adapter!r} not found (not in the model registry, "
                                                      f"nor in {where})", param="model")
        if entry.base and self._bases and entry.base not in self._bases:
            raise BusError(ErrorCode.INVALID_REQUEST, f"adapter {adapter!r} was trained for base model "
                                                      f"{entry.base!r}, not for {sorted(self._bases)[0]!r}",
                           param="model")
        if not entry.source.startswith(ARTIFACT_SOURCE):
            raise BusError(ErrorCode.INVALID_REQUEST, f"adapter {adapter!r} has an unsupported source "
                                                      f"{entry.source!r} (expected '{ARTIFACT_SOURCE}<object>')",
                           param="model")
        if (self._cached(adapter) / ADAPTER_CONFIG).is_file():
            return AdapterRef(adapter, path=self._cached(adapter), entry=entry)
        return AdapterRef(adapter, entry=entry)

    async def fetch(self, adapter: str) -> Path:
        """The local directory of ``adapter``, downloaded and unpacked once; its config is checked."""
        ref = await self.locate(adapter)
        path = ref.path
        if path is None:
            pending = self._fetching.get(adapter)
            if pending is None:  # one download per adapter, however many requests wait for it
                pending = asyncio.ensure_future(self._download(ref))
                self._fetching[adapter] = pending
                pending.add_done_callback(lambda _: self._fetching.pop(adapter, None))
            path = await asyncio.shield(pending)
        read_adapter_config(path, adapter)
        return path

    async def _registry_entry(self, adapter: str) -> ModelEntry | None:
        if self._js is None:
            return None
        try:
            kv = await self._js.key_value(names.MODELS_BUCKET)
            raw = await kv.get(names.slug(adapter))
        except (nats.js.errors.BucketNotFoundError, nats.js.errors.KeyNotFoundError):
            return None
        except (NatsError, asyncio.TimeoutError) as exc:
            raise BusError(ErrorCode.ENGINE_FAILED, f"model registry unavailable: {exc}") from None
        if raw.value is None:
            return None
        try:
            return msgspec.json.decode(raw.value, type=ModelEntry)
        except msgspec.DecodeError as exc:
            raise BusError(ErrorCode.INVALID_REQUEST, f"registry entry of adapter {adapter!r} is broken: {exc}",
                           param="model") from None

    async def _download(self, ref: AdapterRef) -> Path:
        obj = ref.entry.source[len(ARTIFACT_SOURCE):]
        try:
            store = await self._js.object_store(names.ARTIFACTS_STORE)
            result = await artifacts.read_object(store, obj)
        except nats.js.errors.ObjectNotFoundError:
            raise BusError(ErrorCode.MODEL_NOT_FOUND, f"adapter {ref.id!r} is registered but its artifact {obj!r} "
                                                      "is missing from the object store", param="model") from None
        except (NatsError, asyncio.TimeoutError) as exc:
            raise BusError(ErrorCode.ENGINE_FAILED, f"cannot download adapter {ref.id!r}: {exc}") from None
        target = self._cached(ref.id)
        await asyncio.to_thread(_unpack_atomically, result.data or b"", target, ref.id)
        log.info("adapter %s downloaded from %s into %s", ref.id, obj, target)
        return target


def _unpack_atomically(data: bytes, target: Path, adapter: str) -> None:
    """Unpack into ``<target>.partial`` then rename, so a crash never leaves a half adapter in the cache."""
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        artifacts.unpack_dir(data, tmp)
    except (tarfile.TarError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BusError(ErrorCode.INVALID_REQUEST, f"adapter {adapter!r} is broken: bad artifact tar: {exc}",
                       param="model") from None
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


class ThreadedAdapters:
    """Mixin for an engine whose model thread loads adapters (transformers, llama.cpp): the loop-side half.

    Resolves adapters (``self._adapters``, an ``AdapterResolver``) and turns the model thread's
    ``(loaded, loads, evictions)`` reports into ``AdapterChange`` events on the loop. Call
    ``_init_adapters`` in ``__init__``; set ``self._loop`` when the engine starts.
    """

    _loop: asyncio.AbstractEventLoop | None = None

    def _init_adapters(self, resolver: AdapterResolver) -> None:
        self._adapters = resolver
        self._loaded_adapters: list[str] = []
        self._adapter_totals = (0, 0)

    def bind_bus(self, js: JetStreamContext) -> None:
        """Resolve adapters through the model registry and the artifact store of ``js`` too."""
        self._adapters.bind(js)

    async def check_adapter(self, adapter: str) -> None:
        """Known (locally or in the registry) and for this base model, else ``BusError``."""
        await self._adapters.locate(adapter)

    def loaded_adapters(self) -> list[str]:
        """Adapters in the model now, least recently used first."""
        return list(self._loaded_adapters)

    def _adapters_changed(self, loaded: list[str], loads: int, evictions: int) -> None:
        # Runs in the model thread.
        self._loop.call_soon_threadsafe(self._publish_adapters, loaded, loads, evictions)

    def _publish_adapters(self, loaded: list[str], loads: int, evictions: int) -> None:
        before_loads, before_evictions = self._adapter_totals
        self._adapter_totals = (loads, evictions)
        self._loaded_adapters = loaded
        if self.adapter_listener is not None:
            self.adapter_listener(AdapterChange(loaded, loads - before_loads, evictions - before_evictions))
