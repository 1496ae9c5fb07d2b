"""A trainer's NATS node dies mid-job (SIGKILL) on a 3-node cluster: the job still succeeds."""

from __future__ import annotations

import asyncio
import io
import sys
import time

import aiohttp
import openai
import pytest

from services.cli.infra import register_default_model
from services.cli.supervisor import ChildSpec, Supervisor
from services.common.model_store import DEFAULT_MODEL_ID
from tests.cluster_support import bare_nats_cluster, nats_cluster  # noqa: F401 (fixtures)
from tests.e2e.test_e2e_fine_tune import dataset
from tests.support import REPO, free_port, state_dir_with_models, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


async def test_a_job_survives_its_trainers_node(tmp_path, nats_cluster, default_model_dir):
    cluster = nats_cluster
    state = state_dir_with_models(tmp_path, default_model_dir)
    await register_default_model(cluster.url)
    sup = Supervisor(tmp_path / "logs", cwd=REPO, console=None, report=lambda _m: None, stop_timeout=30)
    port = free_port()
    py = sys.executable
    try:
        # Each seeded with a different node: the trainer's is killed, the edge's stays.
        await sup.start(ChildSpec("trainer", (py, "-m", "services.trainer", "--nats-url", cluster.urls[1],
                                              "--state-dir", str(state), "--device", "cpu")))
        await sup.start(ChildSpec("edge", (py, "-m", "services.edge", "--nats-url", cluster.urls[0],
                                           "--port", str(port))))
        async with aiohttp.ClientSession() as http:
            async def healthy() -> bool:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False

            assert await wait_for(healthy, timeout=120)
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                                      max_retries=0) as client:
            uploaded = await client.files.create(file=("z.jsonl", io.BytesIO(dataset())), purpose="fine-tune")
            job = await client.fine_tuning.jobs.create(
                model=DEFAULT_MODEL_ID, training_file=uploaded.id, seed=7,
                hyperparameters={"n_epochs": 6, "batch_size": 4}, extra_body={"peft": {"method": "lora", "r": 4}})

            async def until(predicate, timeout: float):
                deadline = time.monotonic() + timeout
                while True:
                    try:
                        current = await client.fine_tuning.jobs.retrieve(job.id)
                    except openai.InternalServerError as exc:
                        # While the streams' leaders move off the dead node a read may time out: the edge answers
                        # 503 "retry shortly" with Retry-After, which the SDKs retry by default.
                        assert exc.status_code == 503 and time.monotonic() < deadline, exc
                    else:
                        if predicate(current):
                            return current
                        assert time.monotonic() < deadline, f"job {current.status} after {timeout}s"
                    await asyncio.sleep(0.5)

            await until(lambda j: j.status == "running", 300)
            events = await client.fine_tuning.jobs.list_events(job.id, limit=100)
            assert not any(e.message.startswith("Step 6/6") for e in events.data)  # killed mid-job
            cluster.nodes[1].kill()

            done = await until(lambda j: j.status in ("succeeded", "failed", "cancelled"), 600)
            assert done.status == "succeeded", done.error
            events = await client.fine_tuning.jobs.list_events(job.id, limit=100)
            messages = [e.message for e in events.data]
            assert "The job has successfully completed" in messages
            assert messages.count("The job has successfully completed") == 1
    finally:
        await sup.stop_all(("edge", "trainer"))
