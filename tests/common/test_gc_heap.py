"""``gc_heap``: a service freezes its start-up heap, a dropped model's cycles are still freed.

Each case runs in a fresh interpreter: freezing is process-wide, and the test process's own heap
must stay as it is (which is also why only ``lifecycle.run`` enables it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_python(code: str, **env: str) -> str:
    """Run ``code`` in a new interpreter at the repository root; its stdout (it must exit 0)."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          env=os.environ | env, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_only_an_enabled_process_freezes_and_then_collections_skip_what_it_froze():
    out = run_python("""
        import gc
        from services.common import gc_heap
        gc_heap.freeze("a test")
        print("before enable", gc.get_freeze_count())
        gc_heap.enable()
        gc_heap.freeze("a test")
        frozen = gc.get_freeze_count()
        print("after enable", frozen > 1000)
        print("left to scan", len(gc.get_objects()) < frozen / 10)
    """)
    assert "before enable 0\n" in out
    assert "after enable True\n" in out
    assert "left to scan True\n" in out


def test_cy_gc_freeze_0_turns_freezing_off():
    out = run_python("""
        import gc
        from services.common import gc_heap
        gc_heap.enable()
        gc_heap.freeze("a test")
        print(gc.get_freeze_count())
    """, CY_GC_FREEZE="0")
    assert out == "0\n"


def test_release_frees_the_cycles_of_a_dropped_model_and_freezes_the_rest_again():
    out = run_python("""
        import gc, weakref
        from services.common import gc_heap

        class Layer:
            pass

        gc_heap.enable()
        model = Layer()
        model.parent = Layer()
        model.parent.child = model  # a cycle: only the collector frees it
        alive = weakref.ref(model)
        gc_heap.freeze("loading a model")
        del model
        gc.collect()
        print("frozen cycle survives a collection", alive() is not None)
        gc_heap.release()
        print("freed by release", alive() is None)
        print("frozen again", gc.get_freeze_count() > 1000)
    """)
    assert out == ("frozen cycle survives a collection True\n"
                   "freed by release True\n"
                   "frozen again True\n")


def test_release_in_a_process_that_never_froze_only_collects():
    out = run_python("""
        import gc
        from services.common import gc_heap
        gc_heap.release()
        print(gc.get_freeze_count())
    """)
    assert out == "0\n"


def test_a_started_service_times_every_collection_by_generation():
    out = run_python("""
        import gc
        from prometheus_client import CollectorRegistry
        from services.common import gc_heap

        gc.disable()  # only the collections below
        registry = CollectorRegistry()
        pauses = gc_heap.pause_histogram("edge", registry)
        gc_heap.started(pauses)  # not a service yet: no timing
        gc.collect()
        print("before enable", registry.get_sample_value("llm_edge_gc_pause_seconds_count", {"generation": "2"}))
        gc_heap.enable()
        gc_heap.started(pauses)
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
        count = {g: registry.get_sample_value("llm_edge_gc_pause_seconds_count", {"generation": g}) for g in "012"}
        print("counts", count)
        print("summed", registry.get_sample_value("llm_edge_gc_pause_seconds_sum", {"generation": "2"}) > 0)
    """)
    assert out == ("before enable None\n"
                   "counts {'0': 1.0, '1': 0.0, '2': 2.0}\n"
                   "summed True\n")
