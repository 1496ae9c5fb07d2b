"""Garbage-collector pauses of the edge and the engine under load: heap frozen (the default) against not.

    .venv/bin/python bench/gc_pauses.py [--engine transformers|llamacpp] [--requests 1200] [--rounds 4]
                                        [--concurrency 8] [--max-tokens 8] [--slots 8] [--threads 2]
                                        [--record docs/benchmarks.md]

Two platforms run at once on the same model, slots and threads (nats-server, scheduler, edge and
engine, each its own process): one as ``./cy up`` runs it, whose services freeze their start-up
heap (``services/common/gc_heap.py``), and one with ``CY_GC_FREEZE=0``. The load (streaming chat,
``"cache": false``, a distinct prompt per request, greedy) alternates between them in rounds
(ABBA), so drift of the machine hits both alike. Both sides time every collection into
``llm_<service>_gc_pause_seconds``; the table gives, per side and service, what the load added:
full collections (generation 2), their total and largest pause (the upper bound of the highest
bucket reached), all collections' total, and the load's TTFT and completion tok/s. Full
collections are rare (a few per thousand requests), so short loads may show none on either side.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from peer_servers import machine, stream_runner  # noqa: E402
from pipeline_vs_direct import percentile, run_load, start_pipeline  # noqa: E402
from services.common.model_store import default_model_gguf, default_state_dir, ensure_default_model  # noqa: E402
from tests.support import free_port  # noqa: E402

SERVICES = ("edge", "engine")


async def pauses(session: aiohttp.ClientSession, urls: dict[str, str]) -> dict[tuple[str, str], dict]:
    """(service, generation) -> {"count", "sum", "buckets": {le: cumulative count}} from each /metrics."""
    out: dict[tuple[str, str], dict] = {}
    for service, url in urls.items():
        async with session.get(url) as resp:
            text = await resp.text()
        for family in text_string_to_metric_families(text):
            if family.name != f"llm_{service}_gc_pause_seconds":
                continue
            for s in family.samples:
                cell = out.setdefault((service, s.labels["generation"]), {"count": 0, "sum": 0.0, "buckets": {}})
                if s.name.endswith("_count"):
                    cell["count"] = s.value
                elif s.name.endswith("_sum"):
                    cell["sum"] = s.value
                elif s.name.endswith("_bucket"):
                    cell["buckets"][float(s.labels["le"])] = s.value
    return out


def added(before: dict, after: dict, service: str, generation: str) -> tuple[int, float, float]:
    """Collections of ``generation`` between two scrapes: count, total seconds, largest pause's bucket bound."""
    b, a = before.get((service, generation)), after.get((service, generation))
    if a is None:
        return 0, 0.0, 0.0
    b = b or {"count": 0, "sum": 0.0, "buckets": {}}
    if a["count"] == b["count"]:
        return 0, 0.0, 0.0
    largest = 0.0
    for le in sorted(a["buckets"]):
        below = a["buckets"][le] - b["buckets"].get(le, 0)
        if below < a["count"] - b["count"]:
            continue
        largest = le
        break
    return int(a["count"] - b["count"]), a["sum"] - b["sum"], largest


async def main(args) -> None:
    model = default_model_gguf() if args.engine == "llamacpp" else ensure_default_model(default_state_dir())
    sides = {"heap frozen (default)": {}, "CY_GC_FREEZE=0": {"CY_GC_FREEZE": "0"}}
    running, runs = [], {}
    with tempfile.TemporaryDirectory(prefix="cy-gc-") as tmp:
        try:
            for n, (label, env) in enumerate(sides.items()):
                metrics_port = free_port()
                opts = argparse.Namespace(engine=args.engine, slots=args.slots, threads=args.threads,
                                          engine_args=["--metrics-port", str(metrics_port)], env=env)
                server, sup, url = await start_pipeline(Path(tmp) / f"side{n}", opts, model, free_port())
                running.append((server, sup))
                runs[label] = {"url": url, "metrics": {"edge": f"{url}/metrics",
                                                        "engine": f"http://127.0.0.1:{metrics_port}/metrics"},
                               "ttfts": [], "tokens": 0, "secs": 0.0}
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
                for run in runs.values():
                    run["one"] = stream_runner(session, run["url"], "m", args.max_tokens, {"cache": False}, True)
                    await run_load(run["one"], 2, 4)  # warm-up
                    run["before"] = await pauses(session, run["metrics"])
                for r in range(args.rounds):  # ABBA: neither side always goes first
                    for label, run in (list(runs.items()) if r % 2 == 0 else list(runs.items())[::-1]):
                        ttfts, tokens, secs = await run_load(run["one"], args.concurrency,
                                                             args.requests // args.rounds)
                        print(f"round {r + 1}, {label}: {tokens / secs:.1f} tok/s, TTFT max {max(ttfts) * 1000:.0f} ms",
                              file=sys.stderr, flush=True)
                        run["ttfts"] += ttfts
                        run["tokens"] += tokens
                        run["secs"] += secs
                for run in runs.values():
                    run["after"] = await pauses(session, run["metrics"])
        finally:
            for server, sup in running:
                await sup.stop_all(["edge", "scheduler", "engine"])
                server.stop()
    print(table(runs, args))
    if args.record:
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        cmd = " ".join(["bench/gc_pauses.py", *sys.argv[1:]])
        with open(args.record, "a") as f:
            f.write(f"\n### `{cmd}` ({stamp})\n\nMachine: {machine()}.\n\n{table(runs, args)}\n")


def table(runs: dict[str, dict], args) -> str:
    lines = [f"{args.engine} engine, {args.requests} requests a side at concurrency {args.concurrency}, "
             f"{args.max_tokens} tokens each, {args.rounds} rounds.", "",
             "| side | service | full collections | their total ms | largest ≤ ms | all collections ms | "
             "TTFT p50 / p99 / max ms | tok/s |", "|---|---|---|---|---|---|---|---|"]
    for label, run in runs.items():
        ttfts = run["ttfts"]
        load = (f"{percentile(ttfts, 50) * 1000:.0f} / {percentile(ttfts, 99) * 1000:.0f} / "
                f"{max(ttfts) * 1000:.0f} | {run['tokens'] / run['secs']:.1f}")
        for service in SERVICES:
            full, full_s, largest = added(run["before"], run["after"], service, "2")
            every = sum(added(run["before"], run["after"], service, g)[1] for g in "012")
            lines.append(f"| {label} | {service} | {full} | {full_s * 1000:.1f} | {largest * 1000:g} | "
                         f"{every * 1000:.1f} | {load} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", default="transformers", choices=["transformers", "llamacpp"])
    p.add_argument("--requests", type=int, default=1200, help="requests per side")
    p.add_argument("--rounds", type=int, default=4, help="alternations of the two sides")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="engine CPU threads, both sides")
    p.add_argument("--record", type=Path, help="append the table, dated, to this Markdown file")
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
