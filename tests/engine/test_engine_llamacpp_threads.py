"""The llama.cpp engine's decode thread count: all threads while they get the CPUs, one while the host starves them.

The policy (``decode_threads.DecodeThreads``) is a pure function of each decode's wall and CPU
time; what makes switching safe is that llama.cpp's logits do not depend on the thread count,
which is checked on the real model.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from services.engine.backends.llamacpp.decode_threads import (MIN_WALL_S, PROBE_FIRST, PROBE_MOST, STARVED_IN_A_ROW,
                                                              THREAD_NAME, DecodeThreads, ThreadPins)

QUIET = (0.010, 0.019)  # 10 ms wall, both threads on a CPU nearly all of it
STARVED = (0.500, 0.040)  # half a second, mostly waiting for a CPU


def run(policy: DecodeThreads, decodes) -> list[int]:
    return [policy.observe(*d) for d in decodes]


def test_quiet_host_keeps_every_thread():
    assert set(run(DecodeThreads(2), [QUIET] * 1000)) == {2}


def test_two_starved_decodes_in_a_row_fall_back_to_one_thread():
    policy = DecodeThreads(2)
    assert run(policy, [STARVED, QUIET, STARVED, QUIET]) == [2, 2, 2, 2]  # never two in a row
    assert run(policy, [STARVED] * STARVED_IN_A_ROW) == [2] * (STARVED_IN_A_ROW - 1) + [1]
    assert policy.current == 1


def test_short_decodes_are_not_judged():
    policy = DecodeThreads(2)
    assert set(run(policy, [(MIN_WALL_S / 2, 0.0)] * 50)) == {2}


def test_every_thread_is_tried_again_later_and_kept_once_the_host_is_quiet():
    policy = DecodeThreads(2)
    run(policy, [STARVED] * STARVED_IN_A_ROW)
    assert run(policy, [QUIET] * PROBE_FIRST)[-2:] == [1, 2]  # the PROBE_FIRST-th decode on one thread probes
    assert set(run(policy, [QUIET] * 500)) == {2}


def test_a_starved_probe_falls_back_at_once_and_waits_twice_as_long_up_to_a_bound():
    policy = DecodeThreads(2)
    run(policy, [STARVED] * STARVED_IN_A_ROW)
    waits = []
    for _ in range(10):
        wait = 1
        while policy.observe(*STARVED) == 1:  # decodes on one thread until the probe
            wait += 1
        waits.append(wait)
        assert policy.observe(*STARVED) == 1  # the probe itself starved
    assert waits[:3] == [PROBE_FIRST, 2 * PROBE_FIRST, 4 * PROBE_FIRST]
    assert max(waits) == PROBE_MOST


def test_the_wait_shrinks_again_after_a_quiet_spell():
    policy = DecodeThreads(2)
    for _ in range(3):  # fall back, probe successfully, fall back again: the wait grows
        run(policy, [STARVED] * STARVED_IN_A_ROW)
        run(policy, [QUIET] * policy.until_probe)
    assert policy.backoff > PROBE_FIRST
    run(policy, [QUIET] * PROBE_FIRST)
    assert policy.backoff == PROBE_FIRST


def test_one_thread_stays_one_thread():
    assert set(run(DecodeThreads(1), [STARVED] * 300)) == {1}


def test_logits_do_not_depend_on_the_thread_count():
    """What makes switching mid-request invisible: the same logits, bit for bit, on 1 and 2 threads."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="the llama.cpp engine needs the [llamacpp] extra")
    from services.common.model_store import default_model_gguf
    from services.engine.backends.llamacpp.model import ContextShape, GgufModel

    model = GgufModel(default_model_gguf(), ContextShape(n_seq=2, ctx_per_seq=256, threads=2))
    model.load()
    try:
        prompt = model.render_chat([{"role": "user", "content": "Write a short story about a lighthouse keeper."}])
        batch = llama_cpp.llama_batch_init(len(prompt), 0, 1)

        def greedy(threads_at) -> np.ndarray:
            llama_cpp.llama_memory_clear(model.memory, True)
            rows, tokens = [], prompt
            for step in range(24):
                llama_cpp.llama_set_n_threads(model.ctx, threads_at(step), threads_at(step))
                start = len(prompt) + step - len(tokens) if step else 0
                for i, token in enumerate(tokens):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + i, 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = i == len(tokens) - 1
                batch.n_tokens = len(tokens)
                assert llama_cpp.llama_decode(model.ctx, batch) == 0
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(model.ctx, -1), shape=(model.n_vocab,))
                rows.append(logits.copy())
                tokens = [int(logits.argmax())]
            return np.array(rows)

        try:
            two = greedy(lambda step: 2)
            assert np.array_equal(two, greedy(lambda step: 1))
            assert np.array_equal(two, greedy(lambda step: 1 + (step // 3) % 2))  # switched mid-sequence
        finally:
            llama_cpp.llama_batch_free(batch)
    finally:
        model.close()


def _affinity(tid: int) -> set[int]:
    return set(os.sched_getaffinity(tid))


def _in_a_model_thread(threads: int, body) -> dict:
    """Load the real model and run ``body(model, seen)`` in a fresh thread, as the model thread runs; ``seen``."""
    pytest.importorskip("llama_cpp", reason="the llama.cpp engine needs the [llamacpp] extra")
    from services.common.model_store import default_model_gguf
    from services.engine.backends.llamacpp.model import ContextShape, GgufModel

    model = GgufModel(default_model_gguf(), ContextShape(n_seq=1, ctx_per_seq=128, threads=threads))
    model.load()
    seen: dict = {}
    try:
        thread = threading.Thread(target=body, args=(model, seen))
        thread.start()
        thread.join()
    finally:
        model.close()
    return seen


def _bind_in_a_new_thread(mode: str, threads: int) -> dict:
    """Start the team and bind it as the model thread does: what ``ThreadPins.start`` returned and every
    thread's CPUs and kernel name, read while that thread still runs."""

    def model_thread(model, seen: dict) -> None:
        pins = seen["pins"] = ThreadPins.start(model.warm_up, threads, mode)
        seen["tid"] = threading.get_native_id()
        seen["name"] = open(f"/proc/self/task/{seen['tid']}/comm").read().strip()
        if pins is not None:
            seen["bound"] = [_affinity(tid) for tid in pins.threads]
            pins.apply(1)  # the decode falls back to one thread: the model thread may run anywhere again
            seen["one"] = [_affinity(tid) for tid in pins.threads]
            pins.apply(threads)
            seen["again"] = [_affinity(tid) for tid in pins.threads]

    return _in_a_model_thread(threads, model_thread)


def test_each_decode_thread_is_bound_to_a_cpu_of_its_own():
    """The model thread and llama.cpp's OpenMP worker (named after it) on distinct CPUs; unbound while alone."""
    cpus = set(os.sched_getaffinity(0))
    assert len(cpus) >= 2, "this test needs two CPUs"
    seen = _bind_in_a_new_thread("on", 2)
    pins = seen["pins"]
    assert pins is not None and seen["name"] == THREAD_NAME
    assert pins.threads[0] == seen["tid"] and len(pins.threads) == 2
    first, second = seen["bound"]
    assert len(first) == len(second) == 1 and first != second and first | second <= cpus
    assert seen["one"] == [cpus, second]
    assert seen["again"] == [first, second]


def test_threads_filling_the_cpus_are_bound_by_default_and_never_with_off():
    cpus = set(os.sched_getaffinity(0))
    threads = len(cpus)
    assert threads >= 2, "this test needs two CPUs"
    auto = _bind_in_a_new_thread("auto", threads)
    assert auto["pins"] is not None and len(auto["pins"].threads) == threads
    assert set().union(*auto["bound"]) == set(sorted(cpus)[:threads])
    off = _bind_in_a_new_thread("off", threads)
    assert off["pins"] is None


def test_a_bind_that_fails_frees_every_thread_of_the_team():
    """A worker gone (libgomp started a new team): every thread named after the model thread goes back to every CPU."""
    cpus = set(os.sched_getaffinity(0))
    assert len(cpus) >= 2, "this test needs two CPUs"

    def model_thread(model, seen: dict) -> None:
        pins = ThreadPins.start(model.warm_up, 2, "on")
        worker = pins.threads[1]
        seen["bound"] = _affinity(worker)
        pins.threads[1] = 2**22 + 1  # above Linux's largest thread id: this "worker" is gone
        pins.apply(1)
        pins.apply(2)  # binding it fails
        seen["failed"] = pins.failed
        seen["after"] = [_affinity(pins.threads[0]), _affinity(worker)]
        pins.apply(1)
        pins.apply(2)
        seen["later"] = [_affinity(pins.threads[0]), _affinity(worker)]

    seen = _in_a_model_thread(2, model_thread)
    assert len(seen["bound"]) == 1
    assert seen["failed"] and seen["after"] == [cpus, cpus] and seen["later"] == [cpus, cpus]
