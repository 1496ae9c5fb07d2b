"""Seconds per optimizer step: the trainer service (a job over NATS) vs the same peft loop run directly.

    .venv/bin/python bench/train_step.py [--steps N] [--rounds R] [--method lora]

Both sides run the same job: the default model, the same dataset, method, batch size, sequence
length and seed. "direct" builds the model and runs ``TrainingRun`` in this process with no-op
callbacks. "service" starts a private nats-server and a trainer process, uploads the dataset,
submits the job and times consecutive step events (so the KV progress write and the event
publish of every step are inside the measurement). Rounds alternate direct and service on the
same machine; the first step of every run (warm-up) is left out. Prints a table with medians
and the direct/service ratio (1.0 = no overhead).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import msgspec  # noqa: E402
import nats  # noqa: E402
from nats.js.api import ObjectMeta  # noqa: E402

from infra import provision  # noqa: E402
from schemas import names, training  # noqa: E402
from schemas.training import Hyperparameters, JobState, PeftSettings, TrainEvent, TrainingJob  # noqa: E402
from services.common import artifacts  # noqa: E402
from services.common.model_store import DEFAULT_MODEL_ID, default_state_dir, ensure_default_model  # noqa: E402
from services.common.natsserver import NatsServer  # noqa: E402

TOPICS = ["the sea", "mountains", "bread", "bicycles", "owls", "rain", "libraries", "gardens"]


def dataset() -> bytes:
    """32 chat records of a few dozen tokens each."""
    rows = []
    for i in range(32):
        topic = TOPICS[i % len(TOPICS)]
        rows.append({"messages": [{"role": "user", "content": f"Tell me something about {topic} (#{i})."},
                                  {"role": "assistant", "content": f"Here is a fact about {topic}: it is "
                                   f"worth learning about, and people have written about {topic} for centuries."}]})
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def job_spec(args, file_ref: str) -> TrainingJob:
    hp = Hyperparameters(n_epochs=1, batch_size=args.batch_size, max_seq_length=128, max_steps=args.steps,
                         save_steps=0, learning_rate=2e-4)
    return TrainingJob(id=f"ftjob-bench{uuid.uuid4().hex[:12]}", model=DEFAULT_MODEL_ID, training_file=file_ref,
                       peft=PeftSettings(method=args.method), hyperparameters=hp, seed=1,
                       created_at=int(time.time()))


def run_direct(args, data_path: Path, work: Path) -> list[float]:
    """Wall seconds of every optimizer step of the loop run in this process."""
    from transformers import AutoTokenizer

    from services.trainer import datasets, loop, methods

    base = ensure_default_model(default_state_dir())
    job = job_spec(args, str(data_path))
    tok = AutoTokenizer.from_pretrained(base)
    examples, _ = datasets.prepare(data_path, tok, 128)
    model, _ = methods.build_model(base, job.peft, total_steps=args.steps, seed=job.seed)
    run = loop.TrainingRun(model, tok.eos_token_id, list(examples), job.hyperparameters, job.seed, work_dir=work)
    marks = [time.monotonic()]
    run.run(lambda m: marks.append(time.monotonic()), lambda: False, lambda step, d: None)
    return [b - a for a, b in zip(marks, marks[1:])]


async def run_service(args, nc, data: bytes) -> list[float]:
    """Wall seconds between consecutive step events of the same job run by the trainer service."""
    js = nc.jetstream()
    file_id = f"file-bench{uuid.uuid4().hex[:12]}"
    meta = artifacts.FileMeta(id=file_id, filename="bench.jsonl", purpose="fine-tune", bytes=len(data),
                              created_at=int(time.time()))
    store = await js.object_store(names.ARTIFACTS_STORE)
    await store.put(artifacts.file_object(file_id), data, meta=ObjectMeta(description=msgspec.json.encode(meta).decode()))
    job = job_spec(args, file_id)
    marks: list[float] = []
    done = asyncio.Event()

    async def on_event(msg):
        event = msgspec.json.decode(msg.data, type=TrainEvent)
        if event.type == "metrics" and "step" in event.data and "valid_loss" not in event.data:
            marks.append(time.monotonic())
        if event.data.get("status") in training.TERMINAL:
            done.set()

    sub = await nc.subscribe(names.train_job_events(job.id), cb=on_event)
    # The first event marks the start of step 1: the service's "running" event comes just before it.
    started = asyncio.Event()

    async def on_running(msg):
        if msgspec.json.decode(msg.data, type=TrainEvent).data.get("status") == training.RUNNING:
            marks.append(time.monotonic())
            started.set()

    sub2 = await nc.subscribe(names.train_job_events(job.id), cb=on_running)
    await js.publish(names.TRAIN_SUBMIT, msgspec.json.encode(job), headers={"Nats-Msg-Id": job.id})
    await asyncio.wait_for(done.wait(), 1800)
    await sub.unsubscribe()
    await sub2.unsubscribe()
    kv = await js.key_value(names.TRAIN_JOBS_BUCKET)
    state = msgspec.json.decode((await kv.get(job.id)).value, type=JobState)
    if state.status != training.SUCCEEDED:
        raise SystemExit(f"service job ended {state.status}: {state.error}")
    marks.sort()
    return [b - a for a, b in zip(marks, marks[1:])]


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--method", default="lora")
    args = p.parse_args()
    data = dataset()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        data_path = tmp_path / "bench.jsonl"
        data_path.write_bytes(data)
        server = NatsServer(tmp_path / "nats", log_file=tmp_path / "nats.log").start()
        nc = await nats.connect(server.url)
        await provision.apply(nc.jetstream())
        trainer = subprocess.Popen([sys.executable, "-m", "services.trainer", "--nats-url", server.url,
                                    "--state-dir", str(default_state_dir()), "--device", "cpu",
                                    "--trainer-id", "bench-trainer"], cwd=REPO,
                                   stdout=(tmp_path / "trainer.log").open("wb"), stderr=subprocess.STDOUT)
        direct: list[float] = []
        service: list[float] = []
        try:
            for r in range(args.rounds):
                d = run_direct(args, data_path, tmp_path / f"direct-{r}")
                s = await run_service(args, nc, data)
                direct += d[1:]
                service += s[1:]
                print(f"round {r + 1}: direct {statistics.median(d[1:]):.3f} s/step, "
                      f"service {statistics.median(s[1:]):.3f} s/step", flush=True)
        finally:
            trainer.terminate()
            trainer.wait(60)
            await nc.close()
            server.stop()
    d50, s50 = statistics.median(direct), statistics.median(service)
    print()
    print(f"| method | batch | seq | steps measured | direct s/step (p50) | service s/step (p50) | ratio direct/service |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {args.method} | {args.batch_size} | 128 | {len(direct)} + {len(service)} | {d50:.3f} | {s50:.3f} "
          f"| {d50 / s50:.3f} |")


if __name__ == "__main__":
    asyncio.run(main())
