"""The PEFT adapters loaded into one model, bounded by an LRU. Used only from the model thread.

peft injects adapter layers into the transformers model in place, so the batcher keeps
calling the same model object; this class owns the ``PeftModel`` wrapper that loads, deletes
and activates adapters. A forward runs with exactly one adapter active (``activate``), or
with every adapter disabled for base-model rows. peft refuses to mix methods in one
``PeftModel`` ("Cannot combine adapters with different peft types"), so an adapter of another
method than the loaded ones is loaded only once those are all idle (they are unloaded first).
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Collection, Iterator
from pathlib import Path

from schemas.errors import BusError, ErrorCode
from services.engine.lora.sources import read_adapter_config

log = logging.getLogger(__name__)


class AdapterSlots:
    """At most ``capacity`` adapters, least recently used first; only idle adapters are evicted."""

    def __init__(self, model, capacity: int) -> None:
        self.base = model
        self.capacity = max(1, capacity)
        self._peft = None  # PeftModel wrapping ``base`` while any adapter is loaded
        self._lru: OrderedDict[str, str] = OrderedDict()  # adapter id -> peft_type
        self.loads = 0
        self.evictions = 0

    @property
    def loaded(self) -> list[str]:
        """Loaded adapter ids, least recently used first."""
        return list(self._lru)

    def __contains__(self, adapter: str) -> bool:
        return adapter in self._lru

    def ensure(self, adapter: str, path: Path, busy: Collection[str]) -> bool:
        """Make ``adapter`` loaded (evicting idle ones); False if that must wait for ``busy`` adapters to go idle.

        A broken adapter raises ``BusError`` and leaves the loaded set as it was.
        """
        if adapter in self._lru:
            self._lru.move_to_end(adapter)
            return True
        peft_type = read_adapter_config(path, adapter)["peft_type"]
        if self._lru and peft_type != self._peft_type():
            if any(a in busy for a in self._lru):
                return False
            self._unload_all()
        while len(self._lru) >= self.capacity:
            victim = next((a for a in self._lru if a not in busy), None)
            if victim is None:
                return False
            self._evict(victim)
        self._load(adapter, path, peft_type)
        return True

    def _peft_type(self) -> str:
        return next(iter(self._lru.values()))

    def _load(self, adapter: str, path: Path, peft_type: str) -> None:
        from peft import PeftModel  # imported on the first adapter: base-only engines never need peft

        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self.base, str(path), adapter_name=adapter)
            else:
                self._peft.load_adapter(str(path), adapter_name=adapter)
        except (ValueError, RuntimeError, KeyError, OSError, TypeError) as exc:
            self._rollback(adapter)
            raise BusError(ErrorCode.INVALID_REQUEST, f"adapter {adapter!r} cannot be loaded on this base model: "
                                                      f"{type(exc).__name__}: {exc}", param="adapter") from None
        self._peft.eval()
        self._lru[adapter] = peft_type
        self.loads += 1
        log.info("adapter %s (%s) loaded from %s; %d/%d loaded", adapter, peft_type, path, len(self._lru),
                 self.capacity)

    def _rollback(self, adapter: str) -> None:
        """Undo a half-done load so the base model and the other adapters stay exactly as they were."""
        if self._peft is None:
            return
        if not self._lru:
            self._peft.unload()  # the failed adapter was the first: give the plain model back
            self._peft = None
        elif adapter in self._peft.peft_config:
            with contextlib.suppress(ValueError, KeyError):
                self._peft.delete_adapter(adapter)

    def _evict(self, adapter: str) -> None:
        del self._lru[adapter]
        if not self._lru:
            self._peft.unload()  # deleting the last adapter would leave peft with no active adapter
            self._peft = None
        else:
            self._peft.delete_adapter(adapter)
        self.evictions += 1
        log.info("adapter %s evicted (least recently used, idle)", adapter)

    def _unload_all(self) -> None:
        for adapter in list(self._lru):
            self._evict(adapter)

    @contextlib.contextmanager
    def activate(self, adapter: str | None) -> Iterator[None]:
        """Run the enclosed forward with ``adapter`` alone active, or with none (base model) for ``None``."""
        if self._peft is None:
            if adapter is not None:
                raise BusError(ErrorCode.ENGINE_FAILED, f"adapter {adapter!r} is not loaded")
            yield
        elif adapter is None:
            with self._peft.disable_adapter():
                yield
        else:
            self._peft.set_adapter(adapter, inference_mode=True)
            yield
