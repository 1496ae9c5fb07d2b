"""Same model, same requests: straight through the engine backend vs the whole pipeline over HTTP.

    .venv/bin/python bench/pipeline_vs_direct.py [--engine transformers|llamacpp|simulated] [--requests N]

Starts a private nats-server, scheduler, engine and edge (separate processes, as ``./cy up``
does), and in this process the same backend with the same settings. For each concurrency it
alternates direct and pipeline rounds, and prints time to first token
(p50/p99) and completion tokens per second, with the pipeline/direct ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from infra import provision  # noqa: E402
from schemas import ChatMessage, InferenceRequest, SamplingParams  # noqa: E402
from services.cli.readiness import wait_until_ready  # noqa: E402
from services.cli.supervisor import ChildSpec, Supervisor  # noqa: E402
from services.common import bus  # noqa: E402
from services.common.model_store import default_model_gguf, default_state_dir, ensure_default_model  # noqa: E402
from services.common.natsserver import NatsServer  # noqa: E402
from services.engine.backend import Chunk, Finished  # noqa: E402
from services.engine.backends import backend_class  # noqa: E402

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how rain forms.",
           "Give three tips for learning to cook.", "Describe a walk through a forest in autumn.",
           "What makes a good friend?", "Tell me about the history of bicycles.",
           "How do bees make honey?", "Describe the city of the future."]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


async def run_load(one, concurrency: int, total: int) -> tuple[list[float], int, float]:
    """``total`` requests through ``one(i)`` with ``concurrency`` in flight; TTFTs, tokens, wall seconds."""
    ttfts: list[float] = []
    tokens = 0
    counter = iter(range(total))

    async def worker() -> None:
        nonlocal tokens
        for i in counter:
            ttft, n = await one(i)
            ttfts.append(ttft)
            tokens += n

    start = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return ttfts, tokens, time.perf_counter() - start


def direct_runner(backend, max_tokens: int):
    async def one(i: int) -> tuple[float, int]:
        req = InferenceRequest(id=f"d-{uuid.uuid4().hex[:12]}", model="m", reply_to="-",
                               messages=[ChatMessage(role="user", content=PROMPTS[i % len(PROMPTS)])],
                               sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0))
        start = time.perf_counter()
        ttft, n = 0.0, 0
        async for ev in backend.generate(req):
            if isinstance(ev, Chunk) and not ttft and ev.text:
                ttft = time.perf_counter() - start
            elif isinstance(ev, Finished):
                n = ev.completion_tokens
        return ttft, n
    return one


def pipeline_runner(session: aiohttp.ClientSession, url: str, model: str, max_tokens: int):
    async def one(i: int) -> tuple[float, int]:
        # cache off: the same prompts repeat, and a prompt-cache hit would skip the engine entirely.
        body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0, "cache": False,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
        start = time.perf_counter()
        ttft, n = 0.0, 0
        async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
            resp.raise_for_status()
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    n = chunk["usage"]["completion_tokens"]
                elif not ttft and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - start
        return ttft, n
    return one


async def start_pipeline(tmp: Path, args, model_path: Path, port: int) -> tuple[NatsServer, Supervisor, str]:
    server = NatsServer(tmp / "nats", log_file=tmp / "nats.log").start()
    nc = await bus.connect(server.url, "bench")
    await provision.apply(nc.jetstream())
    await nc.close()
    py = sys.executable
    engine = [py, "-m", "services.engine", "--nats-url", server.url, "--engine", args.engine, "--model-id", "m",
              "--worker-id", "bench-engine", "--slots", str(args.slots)]
    if args.engine in ("transformers", "llamacpp"):
        engine += ["--model-path", str(model_path)]
    if args.threads:
        engine += ["--threads", str(args.threads)]
    engine += list(getattr(args, "engine_args", ()))  # extra engine flags (bench/peer_servers.py)
    env = {**os.environ, **getattr(args, "env", {})}  # extra environment of the services (bench/peer_servers.py)
    sup = Supervisor(tmp / "logs", env=env, cwd=REPO, console=None, report=lambda _m: None)
    await sup.start(ChildSpec("engine", tuple(engine)))
    await sup.start(ChildSpec("scheduler", (py, "-m", "services.scheduler", "--nats-url", server.url)))
    await sup.start(ChildSpec("edge", (py, "-m", "services.edge", "--nats-url", server.url, "--port", str(port),
                                       *getattr(args, "edge_args", ()))))  # extra edge flags (bench/peer_servers.py)
    url = f"http://127.0.0.1:{port}"
    await wait_until_ready(url, ["m"], timeout=getattr(args, "ready_timeout", 180))  # vLLM on CPU compiles first
    return server, sup, url


def row(label: str, c: int, ttfts: list[float], tokens: int, secs: float) -> dict:
    return {"mode": label, "c": c, "n": len(ttfts), "p50": percentile(ttfts, 50) * 1000,
            "p99": percentile(ttfts, 99) * 1000, "tps": tokens / secs}


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", default="transformers", choices=["transformers", "llamacpp", "simulated"])
    p.add_argument("--requests", type=int, default=32, help="requests per path and concurrency")
    p.add_argument("--rounds", type=int, default=4, help="alternations of direct and pipeline per concurrency")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--port", type=int, default=18080)
    p.add_argument("--threads", type=int, default=0, help="engine CPU threads, both paths (0: the engine's default)")
    args = p.parse_args()
    # llama.cpp serves the default model's GGUF itself; transformers its safetensors copy.
    model_path = default_model_gguf() if args.engine == "llamacpp" else ensure_default_model(default_state_dir())
    cls = backend_class(args.engine)
    threads = {"threads": args.threads} if args.threads else {}
    backend = (cls(model_path=model_path, model_id="m", slots=args.slots, **threads) if args.engine != "simulated"
               else cls(model_id="m", slots=max(args.slots, 64)))
    await backend.start()
    with tempfile.TemporaryDirectory(prefix="cy-bench-") as tmpdir:
        server, sup, url = await start_pipeline(Path(tmpdir), args, model_path, args.port)
        rows = []
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
                direct, piped = direct_runner(backend, args.max_tokens), pipeline_runner(session, url, "m",
                                                                                          args.max_tokens)
                await run_load(direct, 2, 4)  # warm-up both paths
                await run_load(piped, 2, 4)
                for c in (int(x) for x in args.concurrency.split(",")):
                    # Alternate the two paths in rounds so slow drift of this noisy machine hits both alike.
                    acc = {"direct": ([], 0, 0.0), "pipeline": ([], 0, 0.0)}
                    per_round = max(c, args.requests // args.rounds)
                    for _ in range(args.rounds):
                        for label, one in (("direct", direct), ("pipeline", piped)):
                            t, n, secs = await run_load(one, c, per_round)
                            a = acc[label]
                            acc[label] = (a[0] + t, a[1] + n, a[2] + secs)
                    rows.append(row("direct", c, *acc["direct"]))
                    rows.append(row("pipeline", c, *acc["pipeline"]))
        finally:
            await sup.stop_all(["edge", "scheduler", "engine"])
            server.stop()
            await backend.close()
    print(f"\nengine={args.engine} requests={args.requests} max_tokens={args.max_tokens} slots={args.slots} "
          f"threads={args.threads or 'default'}\n")
    print("| mode | concurrency | requests | TTFT p50 ms | TTFT p99 ms | tokens/s | TTFT p50 added ms | tokens/s ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for i in range(0, len(rows), 2):
        d, pl = rows[i], rows[i + 1]
        for r in (d, pl):
            extra = (f"{pl['p50'] - d['p50']:+.1f} | {pl['tps'] / d['tps']:.3f}" if r is pl else " | ")
            print(f"| {r['mode']} | {r['c']} | {r['n']} | {r['p50']:.1f} | {r['p99']:.1f} | {r['tps']:.1f} | {extra} |")


if __name__ == "__main__":
    asyncio.run(main())
