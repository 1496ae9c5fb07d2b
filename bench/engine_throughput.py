"""Generation throughput of engine backends called directly (no NATS): tokens/s at given concurrencies.

    .venv/bin/python bench/engine_throughput.py [--engine vllm transformers llamacpp llama-cpp-python]
                                                [--concurrency 1 8] [--max-tokens 64] [--rounds 2]
                                                [--vllm-no-lora] [--threads N] [--adapters 0 1 4]
                                                [--temperature T] [--top-p P]

Each engine serves the default model (safetensors copy; the shipped GGUF for ``llamacpp``) with
``slots`` = the highest concurrency. ``llama-cpp-python`` is the reference for the llama.cpp
backend: the library's own ``Llama.create_chat_completion`` streaming on the same GGUF, with the
same threads; it is not thread-safe, so its requests run one after another at every concurrency.
For every concurrency ``c``, ``c`` greedy chat requests with distinct prompts run at once, ``rounds``
times after one warm-up (with ``--temperature`` above 0 they are sampled instead, with ``--top-p``,
seeded per request); tok/s is completion tokens over wall time, summed over all requests.
Engines run one after another so they do not compete for the CPU. vLLM runs with LoRA support on
(as ``--engine vllm`` does); ``--vllm-no-lora`` measures it without.

``--adapters K...`` measures multi-LoRA serving: for each K, the requests are spread round-robin
over K different LoRA adapters (r=8 on q/v/o/down, random weights, made once under the state
directory; 0 = the base model), so K=4 at concurrency 8 is two requests per adapter.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from schemas import ChatMessage, InferenceRequest, SamplingParams  # noqa: E402
from services.common.model_store import default_model_gguf, default_state_dir, ensure_default_model  # noqa: E402
from services.engine.backend import Chunk, Finished  # noqa: E402
from services.engine.backends import backend_class  # noqa: E402

TOPICS = ["a brave cat", "the sea", "a lighthouse", "a robot", "a dragon", "the moon", "a forest", "a train",
          "a baker", "a comet", "a violin", "a desert"]


def request(i: int, max_tokens: int, adapters: list[str] = (), sampling: dict | None = None) -> InferenceRequest:
    """A chat request with a prompt of its own (and the ``i``-th of ``adapters``, round-robin): greedy, or
    ``sampling`` (temperature, top_p) seeded with ``i``."""
    params = (SamplingParams(max_tokens=max_tokens, seed=i, **sampling) if sampling
              else SamplingParams(max_tokens=max_tokens, temperature=0.0))
    return InferenceRequest(id=f"b-{uuid.uuid4().hex[:12]}", model="m", reply_to="unused",
                            adapter=adapters[i % len(adapters)] if adapters else None,
                            messages=[ChatMessage(role="user", content=f"Write a long story about {TOPICS[i % 12]}.")],
                            sampling=params)


async def one(engine, req: InferenceRequest) -> tuple[int, float]:
    """Completion tokens and time to first token of one request."""
    start, ttft, fin = time.perf_counter(), None, None
    async for ev in engine.generate(req):
        if isinstance(ev, Chunk) and ttft is None:
            ttft = time.perf_counter() - start
        elif isinstance(ev, Finished):
            fin = ev
    return fin.completion_tokens, ttft or 0.0


async def measure(engine, concurrency: int, max_tokens: int, rounds: int, adapters: list[str] = (),
                  sampling: dict | None = None) -> tuple[float, float]:
    """Aggregate tok/s and median TTFT (s) over ``rounds`` batches of ``concurrency`` requests."""
    tokens, wall, ttfts = 0, 0.0, []
    for _ in range(rounds):
        start = time.perf_counter()
        results = await asyncio.gather(*[one(engine, request(i, max_tokens, adapters, sampling))
                                         for i in range(concurrency)])
        wall += time.perf_counter() - start
        tokens += sum(n for n, _ in results)
        ttfts += [t for _, t in results]
    return tokens / wall, statistics.median(ttfts)


def reference_llama_cpp(levels: list[int], max_tokens: int, rounds: int, threads: int) -> list[tuple]:
    """llama-cpp-python's own streaming loop on the shipped GGUF, requests one after another."""
    import llama_cpp

    from services.engine.backends.llamacpp.model import default_threads

    started = time.perf_counter()
    llm = llama_cpp.Llama(str(default_model_gguf()), n_ctx=2048, n_threads=threads or default_threads(),
                          n_threads_batch=threads or default_threads(), verbose=False)
    startup = time.perf_counter() - started

    def one_ref(i: int, n: int) -> tuple[int, float]:
        start, ttft, count = time.perf_counter(), None, 0
        messages = [{"role": "user", "content": request(i, n).messages[0].content}]
        for chunk in llm.create_chat_completion(messages, max_tokens=n, temperature=0.0, stream=True):
            if chunk["choices"][0]["delta"].get("content"):
                ttft = ttft or time.perf_counter() - start
                count += 1  # llama-cpp-python streams one chunk per token
        return count, ttft or 0.0

    one_ref(0, 8)
    rows = []
    for c in levels:
        tokens, wall, ttfts = 0, 0.0, []
        for _ in range(rounds):
            start = time.perf_counter()
            results = [one_ref(i, max_tokens) for i in range(c)]
            wall += time.perf_counter() - start
            tokens += sum(n for n, _ in results)
            ttfts += [t for _, t in results]
        rows.append(("llama-cpp-python", c, tokens / wall, tokens / wall / c, statistics.median(ttfts), startup))
    return rows


def make_adapters(model_dir: Path, count: int) -> Path:
    """``count`` LoRA adapters ``bench-lora-<i>`` for the default model, made once; their root directory."""
    from tests.lora_support import make_adapter

    root = default_state_dir() / "bench-adapters"
    for i in range(count):
        if not (root / f"bench-lora-{i}" / "adapter_config.json").is_file():
            make_adapter(model_dir, root / f"bench-lora-{i}", "lora", 100 + i)
    return root


async def bench(name: str, model_dir: Path, levels: list[int], max_tokens: int, rounds: int,
                extra: dict, adapter_levels: list[int] = (0,), sampling: dict | None = None) -> list[tuple]:
    """Start ``name`` on the default model, warm it up, then measure every concurrency level (per adapter count)."""
    path = default_model_gguf() if name == "llamacpp" else model_dir
    if max(adapter_levels):
        extra = extra | {"adapter_dirs": [str(make_adapters(model_dir, max(adapter_levels)))],
                         "max_adapters": max(adapter_levels)}
    engine = backend_class(name)(model_path=path, model_id="m", slots=max(levels), **extra)
    started = time.perf_counter()
    await engine.start()
    startup = time.perf_counter() - started
    rows = []
    try:
        await one(engine, request(0, 8))
        for k in adapter_levels:
            adapters = [f"bench-lora-{i}" for i in range(k)]
            for a in adapters:  # load (and for llama.cpp convert) each adapter outside the measurement
                await one(engine, request(0, 2, [a]))
            label = name + (" (no LoRA)" if extra.get("enable_lora") is False else "") + (f" {k} LoRA" if k else "")
            for c in levels:
                tok_s, ttft = await measure(engine, c, max_tokens, rounds, adapters, sampling)
                rows.append((label, c, tok_s, tok_s / c, ttft, startup))
    finally:
        await engine.close()
    return rows


async def main(args) -> None:
    """Run every engine and print one table."""
    model_dir = ensure_default_model(default_state_dir())
    rows = []
    for name in args.engine:
        if name == "llama-cpp-python":
            rows += reference_llama_cpp(args.concurrency, args.max_tokens, args.rounds, args.threads)
            continue
        extra = {"enable_lora": False} if name == "vllm" and args.vllm_no_lora else {}
        if args.threads:
            extra["threads"] = args.threads
        sampling = {"temperature": args.temperature, "top_p": args.top_p} if args.temperature > 0 else None
        rows += await bench(name, model_dir, args.concurrency, args.max_tokens, args.rounds, extra, args.adapters,
                            sampling)
    print(f"\n{'engine':<26}{'conc':>5}{'tok/s':>10}{'tok/s/req':>11}{'ttft p50':>10}{'startup':>9}")
    for name, c, tok_s, per, ttft, startup in rows:
        print(f"{name:<26}{c:>5}{tok_s:>10.1f}{per:>11.1f}{ttft * 1000:>8.0f}ms{startup:>8.0f}s")


if __name__ == "__main__":  # vLLM spawns worker processes that re-import this module
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", nargs="+", default=["vllm", "transformers"])
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--vllm-no-lora", action="store_true", help="start vLLM without LoRA support")
    p.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="with --temperature: the nucleus")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for every engine (0: each one's default)")
    p.add_argument("--adapters", nargs="+", type=int, default=[0],
                   help="LoRA adapter counts to spread the requests over (0: the base model)")
    parsed = p.parse_args()
    if parsed.temperature > 0 and "llama-cpp-python" in parsed.engine:
        p.error("the llama-cpp-python reference decodes greedily only; leave it out with --temperature")
    asyncio.run(main(parsed))
