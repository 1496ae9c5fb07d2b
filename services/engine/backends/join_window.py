"""Whether a model thread holds its next step for the requests that replace the ones just finished.

Clients that send their next request as soon as the last one ends (a bulk job with a fixed number
of requests in flight, an evaluation harness, a benchmark) keep an engine's batch full. But their
next request needs a few milliseconds to come back through the pipeline (the answer's end to the
client, the new request through the edge, JetStream, the scheduler and the engine's prompt
rendering: 5-20 ms measured at 8 streams on 2 vCPUs while both decode, 4-7 ms when they wait), and
the model thread starts the next step at once. The new request then waits for that whole step
before its prefill starts: its first token comes two steps after it arrived (70-80 ms at 8
streams there, where llama-server, one process, often catches the next step).

So after a step that finished sequences while others run on, with no request waiting, the model
thread may hold the next step until as many new requests came in, for at most ``STEP_SHARE`` of
the step's time and never more than ``longest`` (``--join-window-ms``). It holds while holding
pays: while at least half of the last ``HISTORY`` holds saw a new request come in (each one that
does starts a step sooner, a whole step of its time to first token, for at most a quarter step of
the others' time). Otherwise (open-loop traffic, whose requests do not follow answers) it tries
one hold in ``PROBE_EVERY`` finishing steps, to notice when clients start answering at once
again. What was learnt is forgotten when the engine runs out of work: a job's last requests are
never replaced, and the next job's clients are judged afresh. The cost is bounded by the share:
a held step's running sequences wait at most a quarter of a step, and a hold ends as soon as the
replacements are in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace

from services.engine.backend import JoinStats

DEFAULT_JOIN_WINDOW = 0.012  # seconds: the longest hold, whatever the step time (``--join-window-ms``)
DEFAULT_JOIN_WINDOW_MS = DEFAULT_JOIN_WINDOW * 1000
STEP_SHARE = 0.25  # the longest hold as a share of the step just run
HISTORY = 8  # holds remembered
PROBE_EVERY = 8  # finishing steps per hold while holds do not pay


class JoinWindow:
    """The outcomes of one model thread's recent holds, and whether to hold again."""

    def __init__(self, longest: float = DEFAULT_JOIN_WINDOW) -> None:
        self.longest = longest  # seconds; 0: never hold
        self._outcomes: deque[bool] = deque(maxlen=HISTORY)  # whether each hold saw a request come in
        self._skipped = 0  # finishing steps not held since the last hold
        self._totals = JoinStats()

    def hold(self, step_seconds: float) -> float:
        """Seconds to hold after a finishing step that took ``step_seconds`` (0: do not)."""
        cap = min(self.longest, STEP_SHARE * step_seconds)
        if cap <= 0:
            return 0.0
        if self._pays() or self._skipped + 1 >= PROBE_EVERY:
            self._skipped = 0
            return cap
        self._skipped += 1
        return 0.0

    def held(self, joined: int, seconds: float) -> None:
        """A hold saw ``joined`` new requests arrive before it closed, ``seconds`` after it began."""
        self._outcomes.append(joined > 0)
        self._totals.holds += 1
        self._totals.joined += joined
        self._totals.held_seconds += seconds

    def stats(self) -> JoinStats:
        """Totals since the model thread started (a copy: the model thread writes them, the loop reads them)."""
        return replace(self._totals)

    def idle(self) -> None:
        """Nothing runs any more: the next busy spell starts without the last one's outcomes."""
        self._outcomes.clear()
        self._skipped = 0

    def _pays(self) -> bool:
        return 2 * sum(self._outcomes) >= len(self._outcomes)  # no holds yet: try
