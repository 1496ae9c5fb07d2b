"""The llama.cpp engine's decode thread count: all threads while they get the CPUs, one while the host starves them.

The policy (``decode_threads.DecodeThreads``) is a pure function of each decode's wall and CPU
time; what makes switching safe is that llama.cpp's logits do not depend on the thread count,
which is checked on the real model.
"""

from __future__ import annotations

import numpy as np
import pytest

from services.engine.backends.llamacpp.decode_threads import (MIN_WALL_S, PROBE_FIRST, PROBE_MOST, STARVED_IN_A_ROW,
                                                              DecodeThreads)

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
