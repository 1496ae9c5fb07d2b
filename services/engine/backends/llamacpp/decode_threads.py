"""How many CPU threads the next ``llama_decode`` uses: all of them while they get the CPUs, one while they don't.

llama.cpp's threads meet at an OpenMP barrier after every op and wait there by spinning (bounded
by ``GOMP_SPINCOUNT``, see the package ``__init__``). On a quiet host that is what makes two threads decode at
llama-server's speed. On an oversubscribed host it collapses: one thread spins while the other
waits for a CPU, and the spinner then loses the scheduler's favour a sleeper would have (measured
on 2 vCPUs at load 11-19: 0.8-1.4 s per token against 24-41 ms waiting passively and 27 ms with
one thread, which has no barrier at all). The thread count is the one knob llama.cpp lets a
running context change (``llama_set_n_threads``), and it does not change any logits (checked bit
for bit), so the model thread watches each decode and switches.

The signal is the process's CPU time over the decode's wall time: threads that spin or compute
keep it near their number; threads that are preempted or asleep at a barrier do not. After two
such decodes in a row the next ones run on one thread, and all threads are tried again after
``PROBE_FIRST`` decodes, then (each time it falls back again) twice as many, up to ``PROBE_MOST``;
``PROBE_FIRST`` unstarved decodes in a row bring the wait back to ``PROBE_FIRST``.
"""

from __future__ import annotations

from dataclasses import dataclass

# Below this share of its threads' CPU time a decode counts as starved (2 threads: under 1 CPU busy).
STARVED_SHARE = 0.5
# Decodes shorter than this say little (timer and scheduling noise); they are not judged.
MIN_WALL_S = 0.002
STARVED_IN_A_ROW = 2
PROBE_FIRST = 64
PROBE_MOST = 4096


@dataclass
class DecodeThreads:
    """The thread count for the next decode of one context, from how the previous ones ran."""

    most: int
    current: int = 0
    starved: int = 0
    healthy: int = 0
    until_probe: int = 0
    backoff: int = PROBE_FIRST
    probing: bool = False

    def __post_init__(self) -> None:
        self.current = self.current or self.most

    def observe(self, wall_s: float, cpu_s: float) -> int:
        """Record one decode (its wall time and the process's CPU time meanwhile); the threads for the next."""
        if self.most <= 1:
            return self.current
        if self.current == 1:
            self.until_probe -= 1
            if self.until_probe <= 0:
                self.current, self.probing = self.most, True
            return self.current
        if wall_s < MIN_WALL_S:
            return self.current
        starved = cpu_s < STARVED_SHARE * self.most * wall_s
        if self.probing:
            self.probing = False
            if starved:
                return self._fall_back()
        self.starved = self.starved + 1 if starved else 0
        self.healthy = 0 if starved else self.healthy + 1
        if self.healthy >= PROBE_FIRST:  # contention is over: the next one is caught early again
            self.backoff = PROBE_FIRST
        if self.starved >= STARVED_IN_A_ROW:
            return self._fall_back()
        return self.current

    def _fall_back(self) -> int:
        """One thread from now on; all of them tried again after ``backoff`` decodes, which doubles."""
        self.current, self.starved, self.healthy, self.until_probe = 1, 0, 0, self.backoff
        self.backoff = min(self.backoff * 2, PROBE_MOST)
        return self.current
