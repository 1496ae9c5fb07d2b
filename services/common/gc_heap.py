"""Keep Python's full collections off the token path: freeze what start-up built.

CPython collects reference cycles in three generations. The oldest one holds everything that
survived two collections, so in a service it holds every imported module, the model with its
tokenizer, and the bus connection: objects that live as long as the process. A full collection
scans all of them, and it runs whenever objects promoted since the last one reach a quarter of
that heap. A streaming request lives through many young collections, so its objects are promoted,
and serving a few hundred requests is enough to start one. It holds the GIL throughout, so no
other thread runs Python meanwhile: the model thread's next step and the event loop's token writes wait.

Measured on the 2-vCPU VM of ``docs/benchmarks.md``, one full collection of a started service:
the edge, the scheduler and the llama.cpp engine 5-15 ms, the transformers engine 170 ms, the
vLLM engine's process 290 ms. Serving 1,500 requests at 8 streams, the transformers engine paused
three times for 144-171 ms; with its heap frozen, its full collections took 0.2-3.4 ms.

``freeze`` (once a service has started, and again after the engine loads a model) collects once,
then moves every object alive into the permanent generation, which later collections skip
(``gc.freeze``, as vLLM's engine core and Instagram's servers do). Collections then scan only what
was allocated since. ``release`` undoes it for one collection when a model is dropped, so that
the model's own cycles are freed, and freezes what is left.

Every service times its collections into ``llm_<service>_gc_pause_seconds`` (by generation; 2
is a full collection), from when it has started (``started``).

Only a service process freezes and times: ``lifecycle.run`` enables it. Tests that start a
service inside their own process keep their heap and their collector as they are.
``CY_GC_FREEZE=0`` in a service's environment turns freezing off, not the timing
(``bench/gc_pauses.py`` compares the two).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram

log = logging.getLogger(__name__)

PAUSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

_service = False  # this process is a service (``enable``)
_freezing = False  # ... and freezes its heap (not ``CY_GC_FREEZE=0``)


def enable() -> None:
    """This process is a service: ``freeze`` and ``started`` take effect from now on."""
    global _service, _freezing
    _service = True
    _freezing = os.environ.get("CY_GC_FREEZE", "1") != "0"


def pause_histogram(service: str, registry: CollectorRegistry) -> Histogram:
    """``llm_<service>_gc_pause_seconds``: one service's collections, by generation."""
    return Histogram(f"llm_{service}_gc_pause_seconds",
                     "Garbage-collector pauses (no other thread runs Python meanwhile), by generation (2: full)",
                     ["generation"], buckets=PAUSE_BUCKETS, registry=registry)


def started(pauses: Histogram) -> None:
    """The service has started: freeze its heap, then time every later collection into ``pauses``."""
    freeze("start-up")
    if not _service:
        return
    by_generation = [pauses.labels(str(generation)) for generation in range(3)]
    began = 0.0

    def on_collection(phase: str, info: dict[str, int]) -> None:
        # Runs inside the collection, in the thread that allocated. ``observe`` takes its value locks, which no
        # thread can hold here: their holders allocate no tracked object (what starts a collection) under them.
        nonlocal began
        if phase == "start":
            began = time.perf_counter()
        else:
            by_generation[info["generation"]].observe(time.perf_counter() - began)

    gc.callbacks.append(on_collection)


def freeze(what: str) -> None:
    """Collect once, then exclude every object alive now from later collections (no-op unless enabled)."""
    if not _freezing:
        return
    began = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.info("heap frozen after %s: %d objects, %.0f ms", what, gc.get_freeze_count(),
             (time.perf_counter() - began) * 1000)


def release() -> None:
    """Collect everything, frozen objects included (a model was dropped), then freeze again what survives."""
    frozen = gc.get_freeze_count() > 0
    if frozen:
        gc.unfreeze()
    gc.collect()
    if frozen:
        gc.freeze()


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No automatic collections inside: for a burst of allocations that all stay alive (loading a model).

    Each collection such a burst starts scans a heap that only grows, for nothing to free:
    converting the default GGUF (a first ``./cy up``) spent 4.9-5.1 s of its 20 s in them, and
    the transformers engine's start 0.5 s.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
