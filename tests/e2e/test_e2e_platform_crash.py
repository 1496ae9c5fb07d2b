"""The whole platform killed at once (launcher, nats-server, engine, scheduler, trainer and edge all
SIGKILLed in one sweep, as a power cut of the processes would), then ``./cy up`` again on the same
state directory: it starts over the stale pid file and the uncleanly closed NATS store (and
removes the dead trainer's scratch directory), the fine-tuning job resumes from its last
checkpoint (no step before it is trained again) and succeeds, the uploaded file and the API key
are still there, the fine-tuned model is served, a stream cut by the crash ended with a
connection error and requests after the restart work.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import psutil
import pytest

from schemas.names import slug
from services.cli.pidfile import pid_file, read_pid
from services.common.model_store import DEFAULT_MODEL_ID
from tests.support import REPO, CyUp, state_dir_with_models

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STEPS = 10
SAVE_STEPS = 2
STREAM_PROMPT = [{"role": "user", "content": "Count from one to one thousand in words, one number per line."}]


def dataset() -> bytes:
    rows = [{"messages": [{"role": "user", "content": f"What is code {i}?"},
                          {"role": "assistant", "content": f"Code {i} means the blue door."}]} for i in range(8)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def cy(*args: str) -> subprocess.CompletedProcess:
    """``./cy ARGS`` as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def kill_platform(up: CyUp) -> dict[int, str]:
    """SIGKILL the launcher and every process under it in one sweep (children run in their own
    sessions, so the tree is collected first); the command line of each pid killed, once all are gone."""
    root = psutil.Process(up.proc.pid)
    tree = [root, *root.children(recursive=True)]
    argvs = {p.pid: " ".join(p.cmdline()) for p in tree}
    for proc in tree:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    up.proc.wait()
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, f"still alive after SIGKILL: {alive}"
    return argvs


async def poll_job(client: openai.AsyncOpenAI, job_id: str, predicate, timeout: float):
    """The job once ``predicate`` holds for it; fails when it does not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        job = await client.fine_tuning.jobs.retrieve(job_id)
        if predicate(job):
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job.status} after {timeout}s"
        await asyncio.sleep(0.2)


async def checkpoint_steps(client: openai.AsyncOpenAI, job_id: str) -> list[int]:
    """The steps of the job's recorded checkpoints, oldest first."""
    page = await client.fine_tuning.jobs.checkpoints.list(job_id, limit=100)
    return sorted(c.step_number for c in page.data)


async def start_stream(client: openai.AsyncOpenAI) -> tuple[asyncio.Task, asyncio.Event]:
    """A long streaming chat request read in the background; set once its first content arrived."""
    first = asyncio.Event()

    async def read() -> str:
        text = ""
        stream = await client.chat.completions.create(model=DEFAULT_MODEL_ID, messages=STREAM_PROMPT, stream=True,
                                                      max_tokens=2000, temperature=0, extra_body={"cache": False})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
                first.set()
        return text

    return asyncio.create_task(read()), first


@pytest.mark.timeout(900)  # two start-ups of the platform and a fine-tuning run on a shared CPU
async def test_whole_platform_sigkill_then_up_resumes_the_job(tmp_path: Path, default_model_dir: Path):
    state = state_dir_with_models(tmp_path, default_model_dir)
    up = CyUp(state, "--auth", "keys")
    try:
        up.wait_ready()
        created = cy("keys", "create", "--name", "crash", "--scope", "inference", "--scope", "training",
                     "--nats-url", up.nats_url, "--nats-nkey", up.nkey("operator"))
        assert created.returncode == 0, created.stderr
        key = created.stdout.split()[0]
        async with openai.AsyncOpenAI(base_url=f"{up.url}/v1", api_key=key, max_retries=0, timeout=60) as client:
            content = dataset()
            uploaded = await client.files.create(file=("codes.jsonl", io.BytesIO(content)), purpose="fine-tune")
            job = await client.fine_tuning.jobs.create(
                model=DEFAULT_MODEL_ID, training_file=uploaded.id, suffix="crash", seed=7,
                hyperparameters={"batch_size": 2, "learning_rate_multiplier": 10},
                extra_body={"peft": {"method": "lora", "r": 8, "alpha": 16},
                            "extra_hyperparameters": {"max_steps": STEPS, "save_steps": SAVE_STEPS,
                                                      "max_seq_length": 64}})
            await poll_job(client, job.id, lambda j: j.status == "running", timeout=300)
            deadline = time.monotonic() + 300
            while not await checkpoint_steps(client, job.id):
                assert time.monotonic() < deadline, "no checkpoint within 300 s"
                await asyncio.sleep(0.2)
            stream, first = await start_stream(client)
            await asyncio.wait([stream, asyncio.ensure_future(first.wait())], return_when=asyncio.FIRST_COMPLETED)
            assert first.is_set() and not stream.done(), stream  # streaming when the platform dies
            saved_before = await checkpoint_steps(client, job.id)
            launcher_pid = up.proc.pid
            killed = kill_platform(up)
            with pytest.raises(openai.APIConnectionError):  # the edge died mid-stream: a clear connection error
                await stream
        for part in ("nats-server", "services.engine", "services.scheduler", "services.trainer", "services.edge"):
            assert any(part in argv for argv in killed.values()), (part, killed)  # every kind of process died at once
        assert saved_before and saved_before[-1] < STEPS  # killed mid-job, after a checkpoint
        assert read_pid(pid_file(state)) == launcher_pid  # the stale pid file is left behind
        [trainer_pid] = [pid for pid, argv in killed.items() if "services.trainer" in argv]
        dead_scratch = state / "trainer" / slug(f"trainer-{socket.gethostname()}-{trainer_pid}")
        assert dead_scratch.is_dir()  # the killed trainer's downloads and checkpoints
    finally:
        if up.proc.poll() is None:  # a failure before the crash: stop what runs
            kill_platform(up)

    os.replace(up.log, state / "cy-up.first.out")
    with CyUp(state, "--auth", "keys") as again:
        assert not dead_scratch.exists() and f"trainer that is gone: {dead_scratch}" in again.output()
        async with openai.AsyncOpenAI(base_url=f"{again.url}/v1", api_key=key, max_retries=0, timeout=60) as client:
            assert (await client.files.content(uploaded.id)).content == content  # the upload and the key survived
            done = await poll_job(client, job.id, lambda j: j.status in ("succeeded", "failed", "cancelled"), 600)
            assert done.status == "succeeded", done.error
            events = list(reversed((await client.fine_tuning.jobs.list_events(job.id, limit=200)).data))
            messages = [e.message for e in events]
            resumed = [i for i, m in enumerate(messages) if m.startswith("Resumed from checkpoint at step ")]
            assert len(resumed) == 1, messages
            resumed_at = int(messages[resumed[0]].split()[5])
            assert resumed_at >= saved_before[-1]  # the last checkpoint recorded before the crash, or a later one
            steps_after = [_step(m) for m in messages[resumed[0]:] if m.startswith("Step ")]
            assert steps_after == list(range(resumed_at + 1, STEPS + 1))  # nothing before the checkpoint again
            steps_before = [_step(m) for m in messages[:resumed[0]] if m.startswith("Step ")]
            assert steps_before[:resumed_at] == list(range(1, resumed_at + 1))  # each of those trained once
            assert messages.count("The job has successfully completed") == 1

            assert done.fine_tuned_model in [m.id for m in (await client.models.list()).data]
            tuned = await client.chat.completions.create(model=done.fine_tuned_model, max_tokens=8, temperature=0,
                                                         messages=[{"role": "user", "content": "What is code 3?"}],
                                                         extra_body={"cache": False})
            assert tuned.model == done.fine_tuned_model and tuned.choices[0].message.content
            base = await client.chat.completions.create(model=DEFAULT_MODEL_ID, messages=STREAM_PROMPT, max_tokens=8,
                                                        temperature=0, extra_body={"cache": False})
            assert base.choices[0].message.content and base.usage.completion_tokens > 0  # generated after the restart
        assert again.bus_refusals() == []


def _step(message: str) -> int:
    """The step number of a ``Step N/M: ...`` event."""
    return int(message.split()[1].split("/")[0])

