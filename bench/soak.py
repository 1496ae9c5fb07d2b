"""Soak: the whole platform under a steady mixed load for many minutes; memory of every process, errors.

    .venv/bin/python bench/soak.py [--minutes 30] [--engine llamacpp] [--clients 3] [--out FILE]

Starts ``./cy up`` (embedded NATS, engine, scheduler, trainer, edge; a fresh state dir) and runs
``--clients`` clients for ``--minutes``, each drawing its next request from a fixed mix:
non-streaming and streaming chat (``cache: false``), a repeated question (prompt-cache hits),
``n=2``. Beside them, a fine-tuning job (a small LoRA) runs every ``--train-every`` minutes and a
model is loaded onto the engine and unloaded again every ``--load-every`` minutes.

Every minute it samples the resident memory of each process of the platform. At the end it
prints one JSON object: requests and errors by kind (goal: no error at all, since none is
deliberate), the memory samples, and per process the memory growth over the second half of the
run in MiB per hour (a leak shows as a steady positive slope; allocator warm-up happens in the
first half).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import openai  # noqa: E402
import psutil  # noqa: E402

from services.common.model_store import DEFAULT_MODEL_ID, default_model_gguf, default_state_dir  # noqa: E402
from services.common.model_store import ensure_default_model  # noqa: E402
from tests.engine_models_harness import register  # noqa: E402
from tests.support import CyUp, state_dir_with_models  # noqa: E402

QUESTIONS = ["Name a colour.", "What is two plus two?", "Say hello.", "Name an animal.", "What is the sea?"]
LOADED_MODEL = "soak-extra"


def _role(proc: psutil.Process) -> str:
    """A readable name for one process of the platform."""
    cmd = proc.cmdline()
    if cmd and "python" in Path(cmd[0]).name and "-m" in cmd and cmd.index("-m") + 1 < len(cmd):
        return cmd[cmd.index("-m") + 1].removeprefix("services.")
    return Path(cmd[0]).name if cmd else str(proc.pid)


def _sample(root: psutil.Process) -> dict[str, float]:
    """Resident MiB of the launcher and each of its descendants, by role."""
    out: dict[str, float] = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            role = _role(proc)
            out[role if role not in out else f"{role}-{proc.pid}"] = round(proc.memory_info().rss / 2**20, 1)
        except psutil.NoSuchProcess:
            continue
    return out


def _slope_mib_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (minutes, MiB) points, in MiB per hour."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    den = sum((p[0] - mx) ** 2 for p in points) or 1.0
    return round(sum((p[0] - mx) * (p[1] - my) for p in points) / den * 60, 1)


class Soak:
    """The clients, the side jobs and the tallies of one run."""

    def __init__(self, client: openai.AsyncOpenAI, up: CyUp, args: argparse.Namespace) -> None:
        self.client, self.up, self.args = client, up, args
        self.done: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.deadline = time.monotonic() + args.minutes * 60

    async def _request(self, rng: random.Random) -> None:
        kind = rng.choice(["chat", "stream", "cache_hit", "n2"])
        question = rng.choice(QUESTIONS)
        messages = [{"role": "user", "content": question}]
        if kind == "stream":
            stream = await self.client.chat.completions.create(
                model=DEFAULT_MODEL_ID, messages=messages, max_tokens=24, stream=True, extra_body={"cache": False})
            async for _ in stream:
                pass
        elif kind == "cache_hit":
            await self.client.chat.completions.create(model=DEFAULT_MODEL_ID, messages=messages, max_tokens=8,
                                                      temperature=0)
        else:
            await self.client.chat.completions.create(model=DEFAULT_MODEL_ID, messages=messages, max_tokens=24,
                                                      n=2 if kind == "n2" else 1, extra_body={"cache": False})
        self.done[kind] += 1

    async def client_loop(self, seed: int) -> None:
        """One client: requests back to back until the deadline."""
        rng = random.Random(seed)
        while time.monotonic() < self.deadline:
            try:
                await self._request(rng)
            except openai.APIError as exc:
                self.errors[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1

    async def _every(self, minutes: float, job, name: str) -> None:
        while time.monotonic() + 60 < self.deadline:
            try:
                await job()
                self.done[name] += 1
            except (openai.APIError, AssertionError, TimeoutError) as exc:
                self.errors[f"{name}: {type(exc).__name__}: {str(exc)[:80]}"] += 1
            await asyncio.sleep(max(0.0, minutes * 60))

    async def _train(self) -> None:
        data = "".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant",
                                                                                   "content": "Blue."}]}) + "\n"
                       for q in QUESTIONS).encode()
        uploaded = await self.client.files.create(file=("soak.jsonl", io.BytesIO(data)), purpose="fine-tune")
        job = await self.client.fine_tuning.jobs.create(model=DEFAULT_MODEL_ID, training_file=uploaded.id,
                                                        suffix="soak", hyperparameters={"n_epochs": 1,
                                                                                        "batch_size": 5})
        limit = min(time.monotonic() + 600, self.deadline + 120)
        while job.status not in ("succeeded", "failed", "cancelled"):
            if time.monotonic() > limit:
                raise TimeoutError(f"fine-tuning job still {job.status}")
            await asyncio.sleep(2)
            job = await self.client.fine_tuning.jobs.retrieve(job.id)
        assert job.status == "succeeded", job.error

    async def _load_unload(self) -> None:
        http = self.client.with_options(timeout=300)
        await http.post("/models/load", body={"model": LOADED_MODEL}, cast_to=object)
        await self.client.chat.completions.create(model=LOADED_MODEL, max_tokens=4, extra_body={"cache": False},
                                                  messages=[{"role": "user", "content": "Hi"}])
        await http.delete(f"/models/{LOADED_MODEL}", cast_to=object)

    async def run(self) -> dict:
        """Clients, side jobs and the minute sampler, until the deadline; the figures."""
        root = psutil.Process(self.up.proc.pid)
        samples: list[tuple[float, dict[str, float]]] = []
        started = time.monotonic()

        async def sampler() -> None:
            while time.monotonic() < self.deadline:
                samples.append((round((time.monotonic() - started) / 60, 2), _sample(root)))
                await asyncio.sleep(60)

        await asyncio.gather(sampler(), *(self.client_loop(i) for i in range(self.args.clients)),
                             self._every(self.args.train_every, self._train, "fine_tune"),
                             self._every(self.args.load_every, self._load_unload, "load_unload"))
        samples.append((round((time.monotonic() - started) / 60, 2), _sample(root)))
        half = [s for s in samples if s[0] >= self.args.minutes / 2]
        roles = sorted({r for _, s in samples for r in s})
        return {"minutes": self.args.minutes, "engine": self.args.engine, "clients": self.args.clients,
                "done": dict(self.done), "errors": dict(self.errors),
                "rss_first_mib": samples[0][1], "rss_last_mib": samples[-1][1],
                "growth_second_half_mib_per_hour": {r: _slope_mib_per_hour([(t, s[r]) for t, s in half if r in s])
                                                    for r in roles},
                "samples": samples}


async def main() -> None:
    """Start the platform, soak it, print the figures (and write them to ``--out``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--engine", default="llamacpp", choices=["llamacpp", "transformers"])
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--train-every", type=float, default=10.0, help="minutes between fine-tuning jobs")
    p.add_argument("--load-every", type=float, default=5.0, help="minutes between model load/unload rounds")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    model_dir = ensure_default_model(default_state_dir())
    with tempfile.TemporaryDirectory(prefix="cy-soak-") as tmp:
        with CyUp(state_dir_with_models(Path(tmp), model_dir), "--engine", args.engine, "--quiet") as up:
            nc = await up.nats_connect("operator")
            if args.engine == "llamacpp":
                await register(nc.jetstream(), LOADED_MODEL, default_model_gguf(), format="gguf")
            else:
                await register(nc.jetstream(), LOADED_MODEL, model_dir)
            await nc.close()
            async with openai.AsyncOpenAI(base_url=f"{up.url}/v1", api_key="unused", max_retries=0,
                                          timeout=120) as client:
                result = await Soak(client, up, args).run()
    text = json.dumps(result)
    if args.out:
        args.out.write_text(text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    asyncio.run(main())
