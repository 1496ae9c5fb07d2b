"""Milliseconds per ``llama_decode`` step of one greedy sequence, under context settings compared A/B.

    .venv/bin/python bench/llamacpp_decode_ab.py [--rounds 3] [--tokens 64] [--threads 2] [--slots 32]
                                                 [--config NAME:key=value,key=value ...] [--env NAME:VAR=value]

Why: the platform's llama.cpp engine streamed one request at about 0.6x ``llama-server``'s speed
although both run the same vendored llama.cpp, and nearly all of the engine's time is inside
``llama_decode``. This isolates the decode call: a bare ctypes loop (no engine, no NATS) on the
shipped GGUF, prefill a chat prompt, then ``--tokens`` single-token decodes, each timed. Every
configuration runs in its own process (libgomp reads its environment once, at load) and the
configurations alternate in ``--rounds`` rounds, so a busy host's drift hits all of them alike.

Configurations: ``engine`` is exactly what ``services/engine/backends/llamacpp/model.py`` asks
for; ``server`` is what ``llama-server -np N -c N*ctx`` resolves to (n_batch 2048, n_ubatch 512,
``kv_unified`` false, flash attention auto); more with ``--config name:key=value`` over the
context-params fields (n_seq_max, n_ctx, n_batch, n_ubatch, kv_unified, flash_attn_type, ...),
and ``--env name:VAR=value`` runs a configuration under an extra environment variable.
``--config twoteams:other_thread_decode=true`` first decodes once on another (kept) thread, as
the engine's loader thread used to: libgomp then has two teams and sleeps at every barrier.
Printed per run: median ms per step and voluntary context switches per step (a barrier sleep is one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def warm_decode(llama_cpp, ctx, batch, token: int) -> None:
    """One single-token decode (then the KV cleared), as a warm-up."""
    batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.logits[0] = token, 0, 1, True
    batch.seq_id[0][0] = 0
    batch.n_tokens = 1
    llama_cpp.llama_decode(ctx, batch)
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)


def context_switches() -> int:
    """Voluntary context switches of every thread of this process so far (a sleeping OpenMP barrier is one)."""
    total = 0
    for task in Path("/proc/self/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                total += int(line.split()[1])
    return total


def child(spec: dict) -> None:
    """Run one configuration in this process and print its per-step milliseconds as JSON."""
    sys.path.insert(0, str(REPO))
    if spec.get("engine_env"):
        # What model.py sets before llama_cpp (and libgomp) load.
        os.environ.setdefault("GOMP_SPINCOUNT", "20000")
    import llama_cpp

    from services.common.model_store import default_model_gguf

    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(default_model_gguf()).encode(), mparams)
    vocab = llama_cpp.llama_model_get_vocab(model)
    cparams = llama_cpp.llama_context_default_params()
    for key, value in spec["cparams"].items():
        setattr(cparams, key, value)
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    text = b"<|im_start|>user\nWrite a short story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"
    buf = (llama_cpp.llama_token * 256)()
    n = llama_cpp.llama_tokenize(vocab, text, len(text), buf, 256, False, True)
    prompt = list(buf[:n])
    batch = llama_cpp.llama_batch_init(max(512, n), 0, 1)
    greedy = llama_cpp.llama_sampler_init_greedy()
    if spec.get("other_thread_decode"):
        # What the engine did: its warm-up decode ran on a thread of asyncio.to_thread's pool, which
        # stays alive, so libgomp keeps that thread's OpenMP team beside the model thread's.
        pool = ThreadPoolExecutor(1)
        pool.submit(warm_decode, llama_cpp, ctx, batch, prompt[0]).result()
    steps: list[float] = []
    switches_per_step = 0.0
    for rep in range(2):  # the first pass warms the graph and caches; the second is measured
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        for i, tok in enumerate(prompt):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == n - 1
        batch.n_tokens = n
        llama_cpp.llama_decode(ctx, batch)
        pos = n
        before = context_switches()
        for _ in range(spec["tokens"]):
            tok = llama_cpp.llama_sampler_sample(greedy, ctx, -1)
            batch.token[0], batch.pos[0], batch.n_seq_id[0] = tok, pos, 1
            batch.seq_id[0][0] = 0
            batch.logits[0] = True
            batch.n_tokens = 1
            t0 = time.perf_counter()
            llama_cpp.llama_decode(ctx, batch)
            if rep:
                steps.append((time.perf_counter() - t0) * 1000)
            pos += 1
        switches_per_step = (context_switches() - before) / spec["tokens"]
    print(json.dumps({"steps": steps, "switches": switches_per_step}))


def engine_cparams(args) -> dict:
    """The engine's context parameters (model.py ``GgufModel.load``)."""
    return {"n_seq_max": args.slots, "n_ctx": args.slots * args.context, "n_batch": max(512, args.slots),
            "n_ubatch": max(512, args.slots), "n_threads": args.threads, "n_threads_batch": args.threads,
            "kv_unified": False, "no_perf": True}


def server_cparams(args) -> dict:
    """What llama-server resolves ``-t T -tb T -np N -c N*ctx`` to."""
    return {"n_seq_max": args.slots, "n_ctx": args.slots * args.context, "n_batch": 2048, "n_ubatch": 512,
            "n_threads": args.threads, "n_threads_batch": args.threads, "kv_unified": False, "no_perf": False}


def parse_value(text: str):
    """``true``/``false``, an int, or the text."""
    if text in ("true", "false"):
        return text == "true"
    try:
        return int(text)
    except ValueError:
        return text


def main() -> None:
    """Alternate the configurations in rounds; print ms per step (median, mean, p90) for each."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--config", action="append", default=[], metavar="NAME:key=value,...",
                   help="the engine's parameters with these changed (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="NAME:VAR=value",
                   help="the engine's parameters under an extra environment variable (repeatable)")
    p.add_argument("--only", default="", help="comma-separated configuration names to run")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    base = engine_cparams(args)
    configs = {"engine": ({**base}, {}, True), "server": (server_cparams(args), {}, False)}
    for item in args.config:
        name, _, kvs = item.partition(":")
        over = {k: parse_value(v) for k, v in (kv.split("=", 1) for kv in kvs.split(",") if kv)}
        configs[name] = ({**base, **over}, {}, True)
        if over.pop("other_thread_decode", False):
            configs[name] = ({**base, **over}, {}, "other_thread")
    for item in args.env:
        name, _, kv = item.partition(":")
        var, _, value = kv.partition("=")
        old = configs.get(name, ({**base}, {}, True))
        configs[name] = (old[0], {**old[1], var: value}, old[2])
    if args.only:
        configs = {k: v for k, v in configs.items() if k in args.only.split(",")}
    samples: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, (cparams, env, engine_env) in configs.items():
            spec = {"cparams": cparams, "tokens": args.tokens, "engine_env": bool(engine_env),
                    "other_thread_decode": engine_env == "other_thread"}
            child_env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"} | env
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=child_env,
                                 capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            steps = result["steps"]
            samples[name] += steps
            print(f"{name:>12}: median {statistics.median(steps):6.2f} ms/step, "
                  f"{result['switches']:.0f} voluntary context switches/step, "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    print("\nconfig        median   mean    p90   ms per decode step, all rounds")
    for name, steps in samples.items():
        q = statistics.quantiles(steps, n=10)
        print(f"{name:>12} {statistics.median(steps):6.2f} {statistics.mean(steps):6.2f} {q[-1]:6.2f}")


if __name__ == "__main__":
    main()
