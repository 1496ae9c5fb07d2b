"""The engine's join window on and off, side by side: closed-loop clients through the whole pipeline.

    .venv/bin/python bench/join_window.py [--engine llamacpp|transformers] [--concurrency 8] [--requests 64]

Starts two pipelines (nats-server, scheduler, engine and edge each, as ``./cy up`` runs them), one
engine with the default ``--join-window-ms`` and one with ``--join-window-ms 0``, and runs the same
closed loop against each in alternating rounds: ``--concurrency`` clients, each sending its next
streamed chat request as soon as the last one ends, ``--requests`` a round (long rounds: most
requests replace a finished one, as in a bulk job). Only one pipeline is up at a time. Prints TTFT
p50/p90/p99, tokens/s, and the engine's ``llm_engine_join_*`` counters (services/engine/backends/join_window.py).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))  # pipeline_vs_direct puts the repository on the path
from pipeline_vs_direct import percentile, pipeline_runner, run_load, start_pipeline  # noqa: E402
from services.common.model_store import default_model_gguf, default_state_dir, ensure_default_model  # noqa: E402
from services.engine.backends.join_window import DEFAULT_JOIN_WINDOW_MS  # noqa: E402

METRICS_PORT = 19191


async def round_of(args, tmp: Path, model_path: Path, window: str) -> tuple[list[float], int, float, dict]:
    """One round on a fresh pipeline whose engine has ``--join-window-ms window``."""
    side = argparse.Namespace(engine=args.engine, slots=args.slots, threads=args.threads, env={},
                              engine_args=["--join-window-ms", window, "--metrics-port", str(METRICS_PORT)])
    server, sup, url = await start_pipeline(tmp, side, model_path, args.port)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            one = pipeline_runner(session, url, "m", args.max_tokens)
            await run_load(one, args.concurrency, 2 * args.concurrency)  # warm-up: prompts cached, window learnt
            ttfts, tokens, secs = await run_load(one, args.concurrency, args.requests)
            await asyncio.sleep(2.5)  # the engine samples its counters every heartbeat interval
            text = await (await session.get(f"http://127.0.0.1:{METRICS_PORT}/metrics")).text()
    finally:
        await sup.stop_all(["edge", "scheduler", "engine"])
        server.stop()
    counters = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                if line.startswith("llm_engine_join_") and "_total " in line}
    return ttfts, tokens, secs, counters


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", default="llamacpp", choices=["llamacpp", "transformers"])
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=64, help="requests per round")
    p.add_argument("--rounds", type=int, default=2, help="rounds per side, alternating")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--port", type=int, default=18081)
    args = p.parse_args()
    model_path = default_model_gguf() if args.engine == "llamacpp" else ensure_default_model(default_state_dir())
    sides = {"default": f"{DEFAULT_JOIN_WINDOW_MS:g}", "off": "0"}
    results: dict[str, list] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory(prefix="cy-bench-") as tmpdir:
        for r in range(args.rounds):
            for name, window in sides.items():
                ttfts, tokens, secs, counters = await round_of(args, Path(tmpdir) / f"{name}-{r}", model_path,
                                                               window)
                results[name].append((ttfts, tokens, secs, counters))
                print(f"round {r + 1} {name}: {tokens / secs:.1f} tok/s, "
                      f"TTFT p50 {percentile(ttfts, 50) * 1000:.0f} ms, {counters}", flush=True)
    print(f"\nengine={args.engine} concurrency={args.concurrency} requests/round={args.requests} "
          f"rounds={args.rounds} max_tokens={args.max_tokens} slots={args.slots} threads={args.threads}\n")
    print("| join window | requests | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | tok/s | holds | requests joined "
          "| held s |")
    print("|---|---|---|---|---|---|---|---|---|")
    names = ("llm_engine_join_holds_total", "llm_engine_join_requests_total", "llm_engine_join_hold_seconds_total")
    for name, window in sides.items():
        ttfts = [t for res in results[name] for t in res[0]]
        tokens, secs = sum(res[1] for res in results[name]), sum(res[2] for res in results[name])
        holds, joined, held = (sum(res[3].get(k, 0) for res in results[name]) for k in names)
        ms = [percentile(ttfts, q) * 1000 for q in (50, 90, 99)]
        print(f"| {window} ms | {len(ttfts)} | {ms[0]:.0f} | {ms[1]:.0f} | {ms[2]:.0f} | {tokens / secs:.1f} | "
              f"{holds:.0f} | {joined:.0f} | {held:.2f} |")

if __name__ == "__main__":
    asyncio.run(main())
