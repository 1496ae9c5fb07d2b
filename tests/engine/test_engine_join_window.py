"""The join window: a model thread holds its next step for the requests replacing the ones it just finished,
only while finished requests are seen to be replaced that fast (``services/engine/backends/join_window.py``)."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry

from services.engine.backend import Chunk, Finished, JoinStats
from services.engine.backends.join_window import HISTORY, PROBE_EVERY, JoinWindow
from services.engine.backends.model_thread import ModelThread
from services.engine.config import parse_args
from services.engine.metrics import EngineMetrics


def test_holds_a_quarter_step_at_most_and_never_past_the_longest_wait():
    assert JoinWindow(0.012).hold(0.040) == pytest.approx(0.010)
    assert JoinWindow(0.012).hold(0.100) == pytest.approx(0.012)
    assert JoinWindow(0).hold(1.0) == 0  # --join-window-ms 0: never


def test_holds_while_holds_see_requests_come_in():
    window = JoinWindow()
    for _ in range(HISTORY):
        assert window.hold(0.040) > 0
        window.held(0 if _ % 2 else 1, 0.001)  # half of them did
    assert window.hold(0.040) > 0
    totals = window.stats()
    assert (totals.holds, totals.joined, totals.held_seconds) == (HISTORY, HISTORY // 2, pytest.approx(0.008))


def test_holds_that_see_nothing_come_in_turn_into_occasional_probes():
    window = JoinWindow()
    assert window.hold(0.040) > 0  # nothing known yet: try
    for _ in range(HISTORY):
        window.held(0, 0.010)  # open-loop traffic: nothing follows a finish
    holds = [window.hold(0.040) > 0 for _ in range(3 * PROBE_EVERY)]
    assert holds == ([False] * (PROBE_EVERY - 1) + [True]) * 3


def test_a_probe_that_sees_requests_again_brings_the_holds_back():
    window = JoinWindow()
    for _ in range(HISTORY):
        window.held(0, 0.010)
    for _ in range(HISTORY // 2):
        while not window.hold(0.040):  # skipped finishing steps until the probe
            pass
        window.held(2, 0.004)  # clients answer at once again
    assert all(window.hold(0.040) > 0 for _ in range(3))


def test_an_idle_engine_forgets_the_last_busy_spell():
    window = JoinWindow()
    for _ in range(HISTORY):
        window.held(0, 0.010)  # the end of a job: its last requests are not replaced
    assert window.hold(0.040) == 0
    window.idle()
    assert window.hold(0.040) > 0  # the next job's clients are judged afresh


@dataclass
class _Seq:
    request_id: str
    tokens: int


class _StepThread(ModelThread):
    """A model thread whose steps take ``step`` seconds and give every running sequence one token."""

    def __init__(self, deliver, join_window: float, step: float) -> None:
        super().__init__("test-steps", deliver, join_window)
        self._step = step
        self._seqs: list[_Seq] = []
        self.started: dict[str, int] = {}  # request id -> the step its first token came from

    def run(self) -> None:
        while not self._stopping:
            self._collect(block=not self._seqs and not self._waiting)
            for seq in self._waiting:
                self.started[seq.request_id] = self.steps
            self._seqs += self._waiting
            self._waiting = []
            if not self._seqs:
                continue
            began = time.perf_counter()
            time.sleep(self._step)
            events = []
            for seq in self._seqs:
                seq.tokens -= 1
                events.append((seq.request_id, Finished("length", 1, 1, 0) if seq.tokens == 0 else Chunk("x", [1])))
            self._seqs = [s for s in self._seqs if s.tokens]
            self.steps += 1
            self._hand_over(events, len(self._seqs), time.perf_counter() - began)


def _closed_loop(join_window: float, requests: int) -> tuple[_StepThread, list[tuple[int, str]]]:
    """One long sequence keeps the batch busy; a client sends its next one-token request 10 ms after the last
    one ends, ``requests`` times. Returns the thread and (finishing step, next request id) pairs."""
    ids = (f"r{i}" for i in itertools.count())
    replaced: list[tuple[int, str]] = []
    done = threading.Event()

    def deliver(events) -> None:  # in the model thread, like EventQueues.deliver
        for request_id, event in events:
            if isinstance(event, Finished) and request_id != "long":
                if len(replaced) == requests:
                    done.set()
                    continue
                following = next(ids)
                replaced.append((thread.steps, following))
                threading.Timer(0.010, thread.submit, [_Seq(following, 1)]).start()

    thread = _StepThread(deliver, join_window, step=0.100)
    thread.start()
    thread.submit(_Seq("long", 10_000))
    thread.submit(_Seq(next(ids), 1))
    assert done.wait(60)
    thread.stop()
    thread.join(5)
    return thread, replaced


@pytest.mark.slow
def test_a_replacement_starts_in_the_step_after_its_predecessor_ended():
    thread, replaced = _closed_loop(join_window=0.050, requests=12)
    late = [thread.started[rid] - step for step, rid in replaced[2:]]
    # Step n finished a request; its replacement came 10 ms later, during the hold: it started in step n + 1.
    assert late.count(0) >= len(late) - 1, late  # (one may miss if this host stalled the timer thread)
    stats = thread.join_stats()
    assert stats.holds >= len(late) - 1 and stats.joined >= len(late) - 1
    assert 0 < stats.held_seconds


@pytest.mark.slow
def test_without_the_window_a_replacement_waits_for_the_step_under_way():
    thread, replaced = _closed_loop(join_window=0.0, requests=8)
    late = [thread.started[rid] - step for step, rid in replaced]
    assert late == [1] * len(late)  # it came 10 ms into step n + 1 and started in step n + 2
    assert thread.join_stats().holds == 0


def test_the_flag_refuses_a_negative_window(capsys):
    assert parse_args(["--model-id", "m", "--join-window-ms", "0"]).join_window_ms == 0
    with pytest.raises(SystemExit):
        parse_args(["--model-id", "m", "--join-window-ms", "-1"])
    assert "--join-window-ms" in capsys.readouterr().err


def test_the_engine_counts_holds_joins_and_time_held():
    registry = CollectorRegistry()
    metrics = EngineMetrics(registry)
    metrics.observe_joins(JoinStats(holds=4, joined=3, held_seconds=0.02))
    metrics.observe_joins(JoinStats(holds=6, joined=5, held_seconds=0.03))
    value = registry.get_sample_value
    assert (value("llm_engine_join_holds_total"), value("llm_engine_join_requests_total")) == (6, 5)
    assert value("llm_engine_join_hold_seconds_total") == pytest.approx(0.03)
    metrics.observe_joins(JoinStats(holds=1, joined=0, held_seconds=0.001))  # the model was reloaded: counts restart
    assert value("llm_engine_join_holds_total") == 7
