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

Each thread on a CPU of its own (``ThreadPins``). When a thread that slept at a barrier is woken,
Linux chooses its CPU, and on a VM (this 2-vCPU Firecracker guest) it often chooses the waker's
own, busy CPU over an idle one (a halted vCPU reads as preempted, so not as idle). Both threads
then share one CPU: each barrier waits out the other's whole spin (about 0.5 ms at the default
spin) until the load balancer moves one, and the other CPU stays idle meanwhile. Traced with
the kernel's ``sched_switch``/``sched_wakeup`` events (``perf record``) at one stream: the model
thread was woken 1,481 times in 3,072 tokens and waited 491 us (p50) for its partner's CPU,
1.1 s in all; llama-server's threads, which never sleep between its short gaps, 36 ms. Binding
the model thread and each OpenMP worker to a CPU of its own leaves the kernel no such choice. ``auto`` binds only where the threads fill the CPUs
the process may use (then no CPU is left to move to anyway, and no second engine is expected
on them); while ``DecodeThreads`` keeps the decode on one thread, the model thread is unbound.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

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


# The model thread's kernel name, which the OpenMP workers it starts inherit (at most 15 bytes).
THREAD_NAME = "cy-llamacpp"


class ThreadPins:
    """The model thread and llama.cpp's OpenMP workers, each bound to a CPU of its own (module docstring)."""

    def __init__(self, threads: list[int], cpus: list[int]) -> None:
        self.threads = threads  # native thread ids: the model thread first, then the workers
        self.cpus = cpus  # every CPU the process may use; threads[i] goes to cpus[i]
        self.bound = False
        self.failed = False  # a bind failed: every thread left to the kernel from then on

    @classmethod
    def start(cls, decode: Callable[[], None], threads: int, mode: str) -> ThreadPins | None:
        """Run ``decode`` (the model thread's first, which starts the OpenMP team), then bind its threads.

        None where ``mode`` does not bind them here: ``off``; ``auto`` unless the threads fill the
        CPUs; a platform without CPU affinity; or a team not seen starting (the new threads named
        as the model thread are not exactly ``threads - 1``). The model thread is named
        ``THREAD_NAME`` first, a name its OpenMP workers inherit (as ``top -H`` shows them).
        """
        if mode == "off" or threads < 2 or not hasattr(os, "sched_setaffinity"):
            decode()
            return None
        _name_this_thread(THREAD_NAME)
        before = _task_ids()
        decode()
        workers = sorted(tid for tid in _task_ids() - before if _thread_name(tid) == THREAD_NAME)
        cpus = sorted(os.sched_getaffinity(0))
        if len(workers) != threads - 1 or threads > len(cpus) or (mode == "auto" and threads != len(cpus)):
            log.log(logging.WARNING if mode == "on" else logging.DEBUG,
                    "decode threads not bound (--pin-threads %s): %d threads, %d started, %d CPUs", mode, threads,
                    len(workers) + 1, len(cpus))
            return None
        pins = cls([threading.get_native_id(), *workers], cpus)
        pins.apply(threads)
        return pins

    def apply(self, threads: int) -> None:
        """Bind every thread while ``threads`` of them decode; unbind the model thread while it decodes alone."""
        bound = threads == len(self.threads)
        if bound == self.bound or self.failed:
            return
        try:
            if bound:
                for tid, cpu in zip(self.threads, self.cpus):
                    os.sched_setaffinity(tid, {cpu})
            else:
                os.sched_setaffinity(self.threads[0], self.cpus)
            self.bound = bound
        except OSError as exc:  # a worker gone (libgomp replaced its team): leave the kernel to place them
            log.warning("could not bind llama.cpp's decode threads (%s); leaving them unbound", exc)
            self.failed, self.bound = True, False
            # Any worker started since inherited its starter's CPU: free every thread of the team by its name.
            for tid in {*self.threads, *(t for t in _task_ids() if _thread_name(t) == THREAD_NAME)}:
                try:
                    os.sched_setaffinity(tid, self.cpus)
                except OSError:
                    pass


def _task_ids() -> set[int]:
    """Native ids of this process's threads."""
    return {int(tid) for tid in os.listdir("/proc/self/task")}


def _thread_name(tid: int) -> str:
    """A thread's name as the kernel knows it ('' once it is gone)."""
    try:
        with open(f"/proc/self/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _name_this_thread(name: str) -> None:
    """Set the calling thread's kernel name (``prctl(PR_SET_NAME)``; Python 3.11 names only its own objects)."""
    try:
        ctypes.CDLL(None).prctl(15, name.encode(), 0, 0, 0)  # 15: PR_SET_NAME, at most 15 bytes
    except (OSError, AttributeError):
        pass
