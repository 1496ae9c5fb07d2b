"""Thousands of concurrent SSE streams on one edge: memory per stream, CPU per token, inter-token delay.

    .venv/bin/python bench/edge_streams.py [--streams 2000] [--ramp 10] [--token-rate 5] [--max-tokens 60]
    .venv/bin/python bench/edge_streams.py --real [--streams 1500] [--max-tokens 8]

Default (simulated engines): one NATS node, one scheduler, one edge and two simulated engines
with enough slots for every stream, each sending ``--token-rate`` tokens/s per request (a
realistic pace for a chat reader; ``0`` = as fast as they go). ``--streams`` clients open one
streaming chat completion each, spread evenly over ``--ramp`` seconds (0: all at once), and read
it to ``[DONE]``; with ``--max-tokens`` / ``--token-rate`` longer than the ramp, every stream is
open at the same time. The edge's resident
memory is sampled every 0.25 s (idle, peak, after), its CPU time is read from ``/proc`` before
and after, and every gap between two tokens a client receives is kept.

``--real``: the same burst against one llama.cpp engine serving the shipped SmolLM2 GGUF, so
the inference queue fills to its bound (``LLM_INFER`` ``max_msgs``). Every request beyond the
bound must get its 429 with ``Retry-After`` at once, and every accepted stream must end with a
``finish_reason`` and ``[DONE]`` (none cut). It reports how long the 429s took.

Prints one JSON object. The client runs in the same 2-core box as the platform, so on a small
host the figures include the client's own cost; a bigger host shows the edge alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import nats  # noqa: E402

from infra import provision  # noqa: E402
from services.cli.infra import wait_for_jetstream  # noqa: E402
from services.cli.readiness import wait_until_ready  # noqa: E402
from services.cli.supervisor import ChildSpec, Supervisor  # noqa: E402
from services.cli.up import NATS_CONFIG  # noqa: E402
from services.common.model_store import default_model_gguf  # noqa: E402
from services.common.natsserver import NatsServer, free_ports  # noqa: E402

MODEL = "sim"
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Tally:
    """What the clients saw."""

    ok: int = 0
    cut: int = 0
    refused_429: int = 0
    refused_429_with_retry_after: int = 0
    other_errors: list[str] = field(default_factory=list)
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    header_seconds: list[float] = field(default_factory=list)
    refusal_seconds: list[float] = field(default_factory=list)


def _rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


async def _one(http: aiohttp.ClientSession, base: str, body: dict, tally: Tally, delay: float = 0.0) -> None:
    """One streaming request after ``delay`` s, read to its end; its gaps and outcome go into ``tally``."""
    await asyncio.sleep(delay)
    started = time.monotonic()
    try:
        async with http.post(f"{base}/v1/chat/completions", json=body) as resp:
            if resp.status == 429:
                tally.refused_429 += 1
                tally.refusal_seconds.append(time.monotonic() - started)
                if resp.headers.get("Retry-After"):
                    tally.refused_429_with_retry_after += 1
                return
            tally.header_seconds.append(time.monotonic() - started)
            if resp.status != 200:
                tally.other_errors.append(f"HTTP {resp.status}")
                return
            last, finished, done = None, False, False
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                if line == b"data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        now = time.monotonic()
                        if last is None:
                            tally.ttfts.append(now - started)
                        else:
                            tally.gaps.append(now - last)
                        last = now
                        tally.tokens += 1
                    finished = finished or bool(choice.get("finish_reason"))
            if done and finished:
                tally.ok += 1
            else:
                tally.cut += 1
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        tally.other_errors.append(f"{type(exc).__name__}: {exc}"[:120])


async def _services(sup: Supervisor, url: str, args: argparse.Namespace, port: int) -> tuple[int, str]:
    """Start engines, scheduler and edge; the edge's pid and the served model id."""
    py = sys.executable
    if args.real:
        model = "smollm2"
        await sup.start(ChildSpec("engine-0", (py, "-m", "services.engine", "--nats-url", url, "--engine",
                                               "llamacpp", "--model-id", model, "--model-path",
                                               str(default_model_gguf()), "--slots", "8")))
    else:
        model = MODEL
        slots = str(args.streams // 2 + 64)
        for i in range(2):
            await sup.start(ChildSpec(f"engine-{i}", (py, "-m", "services.engine", "--nats-url", url, "--engine",
                                                      "simulated", "--model-id", model, "--slots", slots,
                                                      "--sim-token-rate", str(args.token_rate))))
    await sup.start(ChildSpec("scheduler", (py, "-m", "services.scheduler", "--nats-url", url)))
    edge = await sup.start(ChildSpec("edge", (py, "-m", "services.edge", "--nats-url", url, "--port", str(port),
                                              "--request-timeout", "900")))
    await wait_until_ready(f"http://127.0.0.1:{port}", [model], timeout=300)
    return edge.proc.pid, model


async def _burst(base: str, model: str, edge_pid: int, args: argparse.Namespace) -> dict:
    """Every stream at once; the edge sampled while they run."""
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me about the sea."}],
            "stream": True, "max_tokens": args.max_tokens, "cache": False}
    tally, samples = Tally(), []
    rss_idle, cpu_before = _rss_mib(edge_pid), _cpu_seconds(edge_pid)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=900)) as http:
        started = time.monotonic()
        step = args.ramp / args.streams
        clients = asyncio.gather(*(_one(http, base, body, tally, i * step) for i in range(args.streams)))
        sampler_stop = asyncio.Event()

        async def sample() -> None:
            while not sampler_stop.is_set():
                samples.append(_rss_mib(edge_pid))
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample())
        await clients
        elapsed = time.monotonic() - started
        sampler_stop.set()
        await sampler
    cpu = _cpu_seconds(edge_pid) - cpu_before
    rss_peak = max(samples, default=rss_idle)

    def pct(xs: list[float], q: int) -> float:
        return round(statistics.quantiles(xs, n=100)[q - 1] * 1000, 1) if len(xs) > 1 else 0.0

    accepted = max(tally.ok + tally.cut, 1)
    return {
        "streams": args.streams, "ramp_s": args.ramp, "token_rate": args.token_rate if not args.real else "model",
        "max_tokens": args.max_tokens, "seconds": round(elapsed, 1),
        "completed": tally.ok, "cut": tally.cut, "refused_429": tally.refused_429,
        "refused_429_with_retry_after": tally.refused_429_with_retry_after,
        "refusal_p99_ms": pct(tally.refusal_seconds, 99), "other_errors": len(tally.other_errors),
        "other_error_kinds": sorted(set(tally.other_errors)),
        "headers_p50_ms": pct(tally.header_seconds, 50), "headers_p99_ms": pct(tally.header_seconds, 99),
        "tokens": tally.tokens, "ttft_p50_ms": pct(tally.ttfts, 50), "ttft_p99_ms": pct(tally.ttfts, 99),
        "inter_token_p50_ms": pct(tally.gaps, 50), "inter_token_p99_ms": pct(tally.gaps, 99),
        "edge_rss_idle_mib": round(rss_idle, 1), "edge_rss_peak_mib": round(rss_peak, 1),
        "edge_rss_after_mib": round(_rss_mib(edge_pid), 1),
        "edge_kib_per_stream": round((rss_peak - rss_idle) * 1024 / accepted, 1),
        "edge_cpu_s": round(cpu, 2), "edge_cpu_us_per_token": round(cpu / max(tally.tokens, 1) * 1e6, 1),
    }


async def main() -> None:
    """Run one burst and print its figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=2000)
    p.add_argument("--token-rate", type=float, default=5.0, help="simulated tokens/s per stream (0 = max)")
    p.add_argument("--max-tokens", type=int, default=60)
    p.add_argument("--ramp", type=float, default=0.0,
                   help="open the streams evenly over this many seconds (0 = all at once, a burst)")
    p.add_argument("--real", action="store_true", help="one llama.cpp engine with the shipped model instead")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="cy-streams-") as tmp_name:
        tmp = Path(tmp_name)
        server = NatsServer(tmp / "nats", config=NATS_CONFIG, log_file=tmp / "nats.log").start()
        sup = Supervisor(tmp / "logs", cwd=REPO, console=None, report=lambda _m: None, stop_timeout=10)
        try:
            await wait_for_jetstream(server.url, timeout=60)
            nc = await nats.connect(server.url)
            await provision.apply(nc.jetstream(), replicas=1)
            await nc.close()
            port = free_ports(1)[0]
            edge_pid, model = await _services(sup, server.url, args, port)
            print(json.dumps(await _burst(f"http://127.0.0.1:{port}", model, edge_pid, args)), flush=True)
        finally:
            await sup.stop_all(("edge", "scheduler", "engine-0", "engine-1"))
            server.stop()


if __name__ == "__main__":
    asyncio.run(main())
