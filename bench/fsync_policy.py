"""The cost of ``sync_interval: always`` (fsync before every acknowledgement) against the nats-server
default (flush every two minutes), side by side in one run.

    .venv/bin/python bench/fsync_policy.py [--messages 2000] [--skip train_step,...] [--full]

First the bare bus: acknowledged JetStream publishes of 600-byte messages to a file stream, one at
a time (p50/p99 latency) and with 32 in flight (msg/s). Then the platform benchmarks, each run
twice, with the one change that its private nats-server gets the policy:

* ``pipeline_vs_direct`` (simulated engine): the pipeline's added latency;
* ``scheduler_throughput``: routed requests/s and the scheduler's added latency;
* ``cache_hit``: prompt-cache hit latency;
* ``train_step``: the trainer's per-step overhead (loads and trains the real model: slow on CPU).

Policies alternate per benchmark so a noisy machine's drift hits both alike. The default counts
are small, to show the shape on a shared machine; ``--full`` uses each benchmark's own counts.
Numbers from a busy host are indicative only: re-run on a quiet machine before quoting them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import runpy
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import nats  # noqa: E402

from services.common import natsserver  # noqa: E402

POLICIES = ("always", "interval")
PAYLOAD = b"x" * 600
IN_FLIGHT = 32
# Small counts for a busy machine: (script, arguments); --full runs each script's defaults.
BENCHES = {
    "pipeline_vs_direct": ("pipeline_vs_direct.py", ["--engine", "simulated", "--requests", "16", "--rounds", "1",
                                                     "--concurrency", "1,8"]),
    "scheduler_throughput": ("scheduler_throughput.py", ["--engines", "2", "--seconds", "2",
                                                         "--latency-requests", "100"]),
    "cache_hit": ("cache_hit.py", ["--requests", "100", "--rounds", "1"]),
    "train_step": ("train_step.py", ["--steps", "3", "--rounds", "1"]),
}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


@dataclass
class BusResult:
    policy: str
    p50_ms: float
    p99_ms: float
    msgs_per_s: float


async def bus_publish(policy: str, messages: int) -> BusResult:
    """Acked publishes on a private server with ``policy``: sequential latency, then 32 in flight."""
    with tempfile.TemporaryDirectory() as tmp:
        server = natsserver.NatsServer(Path(tmp) / "nats", sync=policy).start()
        try:
            nc = await nats.connect(server.url)
            js = nc.jetstream()
            await js.add_stream(name="FSYNC_BENCH", subjects=["fsync.bench"])
            latencies = []
            for _ in range(messages):
                start = time.perf_counter()
                await js.publish("fsync.bench", PAYLOAD)
                latencies.append((time.perf_counter() - start) * 1000)
            window = asyncio.Semaphore(IN_FLIGHT)

            async def one() -> None:
                async with window:
                    await js.publish("fsync.bench", PAYLOAD)

            start = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(messages)))
            rate = messages / (time.perf_counter() - start)
            await nc.close()
        finally:
            server.stop()
    return BusResult(policy, percentile(latencies, 50), percentile(latencies, 99), rate)


def run_bench(name: str, policy: str, full: bool) -> str:
    """One platform benchmark with its nats-server pinned to ``policy``; its output."""
    script, args = BENCHES[name]
    argv = [sys.executable, __file__, "--child", policy, str(REPO / "bench" / script), *([] if full else args)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    if done.returncode != 0:
        return f"FAILED (exit {done.returncode}):\n{done.stderr[-1500:]}"
    return done.stdout.strip()


def child(policy: str, script: str, args: list[str]) -> None:
    """Run ``script`` as ``__main__`` with every NatsServer it starts using ``policy``."""
    base = natsserver.NatsServer

    class PinnedNatsServer(base):  # the benchmark's own code, only its server's fsync differs
        def __init__(self, *a, **kw) -> None:
            kw["sync"] = policy
            super().__init__(*a, **kw)

    natsserver.NatsServer = PinnedNatsServer
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3], sys.argv[4:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=2000, help="publishes per measurement of the bare bus")
    p.add_argument("--skip", default="", help="comma-separated benchmarks to leave out (e.g. train_step)")
    p.add_argument("--full", action="store_true", help="each benchmark's own (larger) default counts")
    args = p.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f}", flush=True)
    print(f"\n== bare bus: acked publish, {len(PAYLOAD)} B, file stream ==", flush=True)
    print(f"{'policy':<10}{'p50 ms':>10}{'p99 ms':>10}{f'msg/s ({IN_FLIGHT} in flight)':>26}")
    for policy in (*POLICIES, *POLICIES):  # twice each, alternating
        r = asyncio.run(bus_publish(policy, args.messages))
        print(f"{r.policy:<10}{r.p50_ms:>10.3f}{r.p99_ms:>10.3f}{r.msgs_per_s:>26.0f}", flush=True)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    for i, name in enumerate(n for n in BENCHES if n not in skip):
        order = POLICIES if i % 2 == 0 else POLICIES[::-1]
        for policy in order:
            print(f"\n== {name} [fsync {policy}] ==", flush=True)
            print(run_bench(name, policy, args.full), flush=True)
    print(f"\nload average at end: {os.getloadavg()[0]:.2f} (numbers from a busy machine: re-run on a quiet one)")


if __name__ == "__main__":
    main()
