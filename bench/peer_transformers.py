"""``transformers serve --continuous-batching``: the peer of the platform's transformers engine (bench/peer_servers.py).

It serves the same converted safetensors copy of the default model that ``./cy up``'s transformers
engine loads (``ensure_default_model``), in float32 on CPU (the engine's ``--dtype auto`` there),
with torch limited to the same threads (``OMP_NUM_THREADS``, read when torch starts). Its
continuous batching runs with ``--attn-implementation sdpa``: the paged ``sdpa_paged`` kernels it
picks otherwise are for CUDA. Its KV pages hold ``slots x context`` tokens in small pages
(``PAGE_TOKENS``), the platform's slots and context per slot, and a step holds at most
``BATCH_TOKENS`` tokens: its default (8,192) sizes a ``[1, 1, 8192, cache + 8192]`` attention mask
for the steps; on a loaded 2-core host an 8-token answer took 52 s with the default and a 10-token
one 13-18 s with 512 (not a clean comparison: the load moved too; re-check on a quiet host).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path

from peer_builds import wait_healthy
from services.common.model_store import default_state_dir, ensure_default_model

PAGE_TOKENS = 32
BATCH_TOKENS = 512  # room for 8 short chat prompts prefilled in one step


def transformers_cli() -> str:
    """The ``transformers`` command of this Python environment."""
    beside = Path(sys.executable).with_name("transformers")
    found = str(beside) if beside.exists() else shutil.which("transformers")
    if not found:
        raise RuntimeError("no 'transformers' command next to this Python (pip install 'transformers[serving]')")
    return found


def transformers_version() -> str:
    """The installed transformers version, for the table's label."""
    import importlib.metadata

    return importlib.metadata.version("transformers")


def serve_argv(model_dir: Path, port: int, slots: int, context: int) -> list[str]:
    """The command line: the model forced (served under its path), continuous batching, CPU float32, sdpa."""
    pages = max(1, slots * context // PAGE_TOKENS)
    return [transformers_cli(), "serve", str(model_dir), "--continuous-batching", "--attn-implementation", "sdpa",
            "--device", "cpu", "--dtype", "float32", "--cb-block-size", str(PAGE_TOKENS),
            "--cb-num-blocks", str(pages), "--cb-max-batch-tokens", str(BATCH_TOKENS), "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]


async def start_transformers_serve(tmp: Path, args, port: int):
    """Start the peer; ``(process, label, url, model name for requests)`` once it serves."""
    model_dir = ensure_default_model(default_state_dir())
    log = tmp / "transformers-serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(*serve_argv(model_dir, port, args.slots, args.context),
                                                    stdout=out, stderr=asyncio.subprocess.STDOUT,
                                                    stdin=asyncio.subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(proc, url, log, "transformers serve")
    except BaseException:
        proc.terminate()
        await proc.wait()
        raise
    return proc, f"transformers serve --continuous-batching ({transformers_version()})", url, str(model_dir)
