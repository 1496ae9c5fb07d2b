"""A batch's throughput against the same lines sent interactively, and what a running batch does to
interactive time to first token.

    .venv/bin/python bench/batch_throughput.py [--lines 1000] [--slots 16] [--batch-concurrency 32]
        [--concurrency 16] [--interactive 200] [--token-rate 200] [--max-tokens 8]

Starts a private nats-server, a SIMULATED engine (``--engine simulated``: no model, a fixed token
rate), a scheduler and an edge (separate processes, as ``./cy up`` runs them). Then:

* interactive TTFT alone: ``--interactive`` streamed chat requests, ``--concurrency`` at a time;
* batch: ``--lines`` requests as one batch (``/v1/files`` + ``/v1/batches``), create to ``completed``;
* the same lines sent interactively (non-streamed) with the batch runner's concurrency;
* interactive TTFT while a second batch of ``--lines`` runs: the low lane must protect it.

Prints one JSON object per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.pipeline_vs_direct import percentile, pipeline_runner, run_load  # noqa: E402
from infra import provision  # noqa: E402
from services.cli.readiness import wait_until_ready  # noqa: E402
from services.cli.supervisor import ChildSpec, Supervisor  # noqa: E402
from services.common import bus  # noqa: E402
from services.common.natsserver import NatsServer  # noqa: E402
from tests.support import free_port  # noqa: E402

MODEL = "m"


def line(i: int, max_tokens: int) -> dict:
    """One batch input line (and the body of its interactive twin)."""
    return {"custom_id": f"b{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "max_tokens": max_tokens, "cache": False,
                     "messages": [{"role": "user", "content": f"line {i} of the benchmark batch"}]}}


async def start(tmp: Path, args) -> tuple[NatsServer, Supervisor, str]:
    """nats-server (provisioned), simulated engine, scheduler and edge; the edge's URL once it serves."""
    server = NatsServer(tmp / "nats", log_file=tmp / "nats.log").start()
    nc = await bus.connect(server.url, "bench")
    await provision.apply(nc.jetstream())
    await nc.close()
    py, port = sys.executable, free_port()
    sup = Supervisor(tmp / "logs", cwd=REPO, console=None, report=lambda _m: None)
    await sup.start(ChildSpec("engine", (py, "-m", "services.engine", "--nats-url", server.url, "--engine",
                                         "simulated", "--model-id", MODEL, "--worker-id", "bench-engine", "--slots",
                                         str(args.slots), "--sim-token-rate", str(args.token_rate))))
    await sup.start(ChildSpec("scheduler", (py, "-m", "services.scheduler", "--nats-url", server.url)))
    await sup.start(ChildSpec("edge", (py, "-m", "services.edge", "--nats-url", server.url, "--port", str(port),
                                       "--batch-concurrency", str(args.batch_concurrency))))
    url = f"http://127.0.0.1:{port}"
    await wait_until_ready(url, [MODEL], timeout=120)
    return server, sup, url


async def submit(http: aiohttp.ClientSession, url: str, lines: int, max_tokens: int) -> str:
    """Upload and create a batch of ``lines``; its id."""
    data = b"".join(json.dumps(line(i, max_tokens)).encode() + b"\n" for i in range(lines))
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", data, filename="bench.jsonl")
    async with http.post(f"{url}/v1/files", data=form) as resp:
        file_id = (await resp.json())["id"]
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    async with http.post(f"{url}/v1/batches", json=body) as resp:
        return (await resp.json())["id"]


async def wait_done(http: aiohttp.ClientSession, url: str, batch_id: str) -> dict:
    """The batch once it ended."""
    while True:
        async with http.get(f"{url}/v1/batches/{batch_id}") as resp:
            batch = await resp.json()
        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
            return batch
        await asyncio.sleep(0.2)


async def interactive_lines(http: aiohttp.ClientSession, url: str, lines: int, concurrency: int,
                            max_tokens: int) -> float:
    """The batch's lines as plain non-streamed requests; seconds for all of them."""
    todo = iter(range(lines))

    async def worker() -> None:
        for i in todo:
            async with http.post(f"{url}/v1/chat/completions", json=line(i, max_tokens)["body"]) as resp:
                resp.raise_for_status()
                await resp.read()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start


def ttft_row(phase: str, ttfts: list[float]) -> dict:
    return {"phase": phase, "n": len(ttfts), "ttft_p50_ms": round(percentile(ttfts, 50) * 1000, 1),
            "ttft_p99_ms": round(percentile(ttfts, 99) * 1000, 1)}


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lines", type=int, default=1000)
    p.add_argument("--slots", type=int, default=16, help="the simulated engine's concurrent requests")
    p.add_argument("--batch-concurrency", type=int, default=32, help="lines the edge's batch runner runs at once")
    p.add_argument("--concurrency", type=int, default=16, help="interactive requests in flight")
    p.add_argument("--interactive", type=int, default=200, help="interactive requests per TTFT phase")
    p.add_argument("--token-rate", type=float, default=200.0, help="simulated tokens/s per request")
    p.add_argument("--max-tokens", type=int, default=8)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server, sup, url = await start(Path(tmp), args)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
                ask = pipeline_runner(http, url, MODEL, args.max_tokens)
                ttfts, _, _ = await run_load(ask, args.concurrency, args.interactive)
                print(json.dumps(ttft_row("interactive alone", ttfts)), flush=True)

                start_at = time.perf_counter()
                batch = await wait_done(http, url, await submit(http, url, args.lines, args.max_tokens))
                secs = time.perf_counter() - start_at
                print(json.dumps({"phase": "batch", "lines": args.lines, "status": batch["status"],
                                  "counts": batch["request_counts"], "seconds": round(secs, 2),
                                  "lines_per_s": round(args.lines / secs, 1)}), flush=True)
                secs = await interactive_lines(http, url, args.lines, args.batch_concurrency, args.max_tokens)
                print(json.dumps({"phase": "same lines interactively", "lines": args.lines,
                                  "concurrency": args.batch_concurrency, "seconds": round(secs, 2),
                                  "lines_per_s": round(args.lines / secs, 1)}), flush=True)

                running = await submit(http, url, args.lines, args.max_tokens)
                ttfts, _, _ = await run_load(ask, args.concurrency, args.interactive)
                print(json.dumps(ttft_row("interactive during a batch", ttfts)), flush=True)
                batch = await wait_done(http, url, running)
                print(json.dumps({"phase": "that batch", "status": batch["status"],
                                  "counts": batch["request_counts"]}), flush=True)
        finally:
            await sup.stop_all(["edge", "scheduler", "engine"])
            server.stop()


if __name__ == "__main__":
    asyncio.run(main())
