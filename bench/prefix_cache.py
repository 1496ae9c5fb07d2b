"""Time to first token behind a long shared system prompt, transformers engine, prefix cache on vs off.

    .venv/bin/python bench/prefix_cache.py [--prefix-tokens 1000] [--requests 8] [--threads N]

Two transformers engines serve the default model (safetensors copy) in this process: one with
the prompt-prefix cache (``--prefix-cache-bytes`` default), one without (``0``). Every request is a
greedy chat whose system turn is the same ``--prefix-tokens``-token text and whose user turn is
its own question; each engine first answers one such request (its cache is then warm), then the
engines take turns request by request so machine drift hits both alike. Prints TTFT p50 / mean /
max per engine, the reused tokens the cached engine reported (``cached_tokens``), and the load
average before and after. Called directly (no NATS): the engine's own prefill, nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from schemas import ChatMessage, InferenceRequest, SamplingParams  # noqa: E402
from services.common.model_store import default_state_dir, ensure_default_model  # noqa: E402
from services.engine.backend import Chunk, Finished  # noqa: E402
from services.engine.backends.transformers.engine import TransformersEngine  # noqa: E402

RULE = ("Rule {i}: when a visitor asks about berth {i}, the tide tables of week {i} or the lighthouse keeper's "
        "schedule on day {i}, answer briefly and politely, and point them to the harbour office. ")


def system_prompt(tokenizer, tokens: int) -> str:
    """Harbour-master rules until the text is ``tokens`` tokens long (cut to exactly that)."""
    text, i = "You are the harbour master's assistant in a small fishing town. ", 1
    while len(ids := tokenizer(text).input_ids) < tokens:
        text += RULE.format(i=i)
        i += 1
    return tokenizer.decode(ids[:tokens])


def ask(system: str, i: int) -> InferenceRequest:
    """The ``i``-th question behind ``system``."""
    return InferenceRequest(id=f"pc-{uuid.uuid4().hex[:12]}", model="m", reply_to="unused",
                            messages=[ChatMessage(role="system", content=system),
                                      ChatMessage(role="user", content=f"Question {i}: is berth {i * 7} free today?")],
                            sampling=SamplingParams(max_tokens=2, temperature=0.0))


async def ttft(engine, req: InferenceRequest) -> tuple[float, Finished]:
    """Seconds to the first chunk, and the finish event."""
    start, first, fin = time.perf_counter(), None, None
    async for ev in engine.generate(req):
        if isinstance(ev, Chunk) and first is None:
            first = time.perf_counter() - start
        elif isinstance(ev, Finished):
            fin = ev
    return first, fin


async def main(args) -> None:
    """Start both engines, warm them, alternate requests, print the table."""
    model_dir = ensure_default_model(default_state_dir())
    extra = {"threads": args.threads} if args.threads else {}
    engines = {"cache on": TransformersEngine(model_path=model_dir, model_id="m", slots=8, **extra),
               "cache off": TransformersEngine(model_path=model_dir, model_id="m", slots=8, prefix_cache_bytes=0,
                                               **extra)}
    for engine in engines.values():
        await engine.start()
    load_before = os.getloadavg()[0]
    try:
        system = system_prompt(engines["cache on"].tokenizer, args.prefix_tokens)
        prompt_len = len(engines["cache on"].render(ask(system, 0)).ids)
        cold = {name: (await ttft(engine, ask(system, 0)))[0] for name, engine in engines.items()}
        times: dict[str, list[float]] = {name: [] for name in engines}
        reused: list[int] = []
        for i in range(1, args.requests + 1):
            for name, engine in engines.items():
                seconds, fin = await ttft(engine, ask(system, i))
                times[name].append(seconds)
                if name == "cache on":
                    reused.append(fin.cached_tokens)
    finally:
        for engine in engines.values():
            await engine.close()
    print(f"\nprompt {prompt_len} tokens (system turn ~{args.prefix_tokens}), {args.requests} requests per engine, "
          f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{'engine':<12}{'cold':>9}{'p50':>9}{'mean':>9}{'max':>9}  reused tokens")
    for name, values in times.items():
        note = f"{min(reused)}-{max(reused)}" if name == "cache on" else "0"
        print(f"{name:<12}{cold[name] * 1000:>7.0f}ms{statistics.median(values) * 1000:>7.0f}ms"
              f"{statistics.fmean(values) * 1000:>7.0f}ms{max(values) * 1000:>7.0f}ms  {note}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefix-tokens", type=int, default=1000, help="tokens of the shared system prompt")
    p.add_argument("--requests", type=int, default=8, help="measured requests per engine (after one warm-up)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    asyncio.run(main(p.parse_args()))
