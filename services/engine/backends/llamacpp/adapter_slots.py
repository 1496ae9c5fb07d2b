"""The GGUF LoRA adapters loaded into one llama.cpp model, bounded by an LRU. Used only from the model thread.

llama.cpp loads an adapter into the model (``llama_adapter_lora_init``) and applies the set
given to the context (``llama_set_adapters_lora``) to every row of the next ``llama_decode``.
So the batch generator decodes each adapter's sequences in their own ``llama_decode`` and
calls ``apply`` before each one; the KV each sequence keeps was computed with its own adapter.
"""

from __future__ import annotations

import ctypes
import logging
from collections import OrderedDict
from collections.abc import Callable, Collection
from pathlib import Path

import llama_cpp

from schemas.errors import BusError, ErrorCode
from services.engine.backends.llamacpp.model import GgufModel

log = logging.getLogger(__name__)

# Called from the model thread when the loaded adapters change: (loaded ids, total loads, total evictions).
AdapterListener = Callable[[list[str], int, int], None]


class GgufLoras:
    """At most ``capacity`` adapters, least recently used first; only idle adapters are evicted."""

    def __init__(self, model: GgufModel, capacity: int, on_change: AdapterListener | None = None) -> None:
        self._model = model
        self.capacity = max(1, capacity)
        self._on_change = on_change
        self._lru: OrderedDict[str, tuple[Path, object]] = OrderedDict()  # adapter id -> (GGUF path, pointer)
        self._applied: str | None = None
        self.loads = 0
        self.evictions = 0
        self.switches = 0

    @property
    def loaded(self) -> list[str]:
        """Loaded adapter ids, least recently used first."""
        return list(self._lru)

    def ensure(self, adapter: str, path: Path, busy: Collection[str]) -> bool:
        """Make ``adapter`` (the GGUF at ``path``) loaded, evicting idle ones; False while all are ``busy``.

        An adapter whose file changed (a new conversion) is reloaded. llama.cpp refusing the file
        raises ``BusError`` and leaves the loaded set as it was.
        """
        held = self._lru.get(adapter)
        if held is not None and held[0] == path:
            self._lru.move_to_end(adapter)
            return True
        if held is not None:
            if adapter in busy:
                return False
            self._free(adapter)
        while len(self._lru) >= self.capacity:
            victim = next((a for a in self._lru if a not in busy), None)
            if victim is None:
                return False
            self._free(victim)
            self.evictions += 1
            log.info("adapter %s evicted (least recently used, idle)", victim)
        pointer = llama_cpp.llama_adapter_lora_init(self._model.handle, str(path).encode())
        if not pointer:
            self._changed()
            raise BusError(ErrorCode.INVALID_REQUEST, f"adapter {adapter!r} cannot be loaded on this base model: "
                                                      f"llama.cpp refused {path.name}", param="adapter")
        self._lru[adapter] = (path, pointer)
        self.loads += 1
        log.info("adapter %s loaded into llama.cpp from %s; %d/%d loaded", adapter, path, len(self._lru),
                 self.capacity)
        self._changed()
        return True

    def apply(self, adapter: str | None) -> None:
        """Make the next ``llama_decode`` run with ``adapter`` alone (scale 1: peft's scale is in the file), or none."""
        if adapter == self._applied:
            return
        if adapter is None:
            rc = llama_cpp.llama_set_adapters_lora(self._model.ctx, None, 0, None)
        else:
            pointers = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._lru[adapter][1])
            rc = llama_cpp.llama_set_adapters_lora(self._model.ctx, pointers, 1, (ctypes.c_float * 1)(1.0))
        if rc != 0:
            raise RuntimeError(f"llama_set_adapters_lora failed with {rc}")
        self._applied = adapter
        self.switches += 1

    def _free(self, adapter: str) -> None:
        if self._applied == adapter:
            self.apply(None)
        _, pointer = self._lru.pop(adapter)
        llama_cpp.llama_adapter_lora_free(pointer)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.loaded, self.loads, self.evictions)

    def close(self) -> None:
        """Free every adapter (before the model is freed)."""
        for adapter in list(self._lru):
            self._free(adapter)
