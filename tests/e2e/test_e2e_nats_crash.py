"""SIGKILL the single NATS node while files are uploaded and fine-tuning jobs submitted, restart it:
every upload and job the edge acknowledged is still there (file contents, job state, its place in
the training queue); what failed during the outage failed with an OpenAI error, never a false 200.

A SIGKILL leaves the kernel's page cache intact, so this proves the store recovers and nothing
acknowledged is lost to a process crash; that an OS crash loses nothing either rests on the
server fsyncing before it acknowledges (``sync_interval: always``, checked through ``/varz`` in
tests/cli/test_cli_up_fsync.py), which a test cannot power-cycle.
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from pathlib import Path

import nats
import openai
import pytest

from infra import provision
from schemas import names
from services.cli.infra import register_default_model
from services.cli.up import NATS_CONFIG
from services.common.model_store import DEFAULT_MODEL_ID
from services.common.natsserver import NatsServer
from tests.support import REPO, free_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
WORKERS = 4


def dataset(i: int) -> bytes:
    row = {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
    return (json.dumps(row) + "\n").encode()


class Load:
    """Clients uploading a file and submitting a job on it, over and over; what was acknowledged."""

    def __init__(self, client: openai.AsyncOpenAI) -> None:
        self.client = client
        self.files: dict[str, bytes] = {}
        self.jobs: list[str] = []
        self.failures: list[Exception] = []
        self.stop = asyncio.Event()
        self.counter = 0

    async def worker(self) -> None:
        while not self.stop.is_set():
            self.counter += 1
            content = dataset(self.counter)
            try:
                uploaded = await self.client.files.create(file=(f"d{self.counter}.jsonl", io.BytesIO(content)),
                                                          purpose="fine-tune")
                self.files[uploaded.id] = content
                job = await self.client.fine_tuning.jobs.create(model=DEFAULT_MODEL_ID, training_file=uploaded.id)
                self.jobs.append(job.id)
            except (openai.APIStatusError, openai.APIConnectionError) as exc:
                self.failures.append(exc)
                await asyncio.sleep(0.05)  # pacing while the bus is down, not a wait for a condition


@pytest.mark.timeout(600)
async def test_acknowledged_uploads_and_jobs_survive_a_killed_nats_node(tmp_path: Path):
    port = free_port()
    # As ./cy up starts it: its config, fsync before acknowledging.
    server = NatsServer(tmp_path / "nats", port=port, config=NATS_CONFIG, sync="always",
                        log_file=tmp_path / "nats.log").start()
    nc = await nats.connect(server.url)
    await provision.apply(nc.jetstream())
    await nc.close()
    await register_default_model(server.url)  # jobs fine-tune a model the registry knows
    http_port = free_port()
    edge = subprocess.Popen([sys.executable, "-m", "services.edge", "--nats-url", server.url, "--port", str(http_port),
                             "--publish-timeout", "2"], cwd=REPO, stdout=(tmp_path / "edge.log").open("wb"),
                            stderr=subprocess.STDOUT)
    try:
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused",
                                      max_retries=0, timeout=10) as client:
            assert await wait_for(lambda: _answers(client), timeout=60, interval=0.2), "the edge did not start"
            load = Load(client)
            workers = [asyncio.create_task(load.worker()) for _ in range(WORKERS)]

            assert await wait_for(lambda: _true(len(load.jobs) >= 5), timeout=120), load.failures[-3:]
            server.proc.kill()  # SIGKILL: no shutdown, no flush by the server
            server.proc.wait()
            failed_before = len(load.failures)
            assert await wait_for(lambda: _true(len(load.failures) > failed_before), timeout=60)
            server = NatsServer(tmp_path / "nats", port=port, config=NATS_CONFIG, sync="always",
                                log_file=tmp_path / "nats.log").start()
            jobs_at_restart = len(load.jobs)
            assert await wait_for(lambda: _true(len(load.jobs) >= jobs_at_restart + 5), timeout=120), \
                "the edge did not acknowledge new jobs after NATS came back"
            load.stop.set()
            await asyncio.gather(*workers)

            for file_id, content in load.files.items():
                assert (await client.files.content(file_id)).content == content, file_id
            for job_id in load.jobs:
                assert (await client.fine_tuning.jobs.retrieve(job_id)).status == "queued", job_id
        assert all(getattr(f, "status_code", 503) >= 500 for f in load.failures), load.failures
        queued = await _queued_job_ids(server.url)
        assert set(load.jobs) <= queued  # each acknowledged job still waits for a trainer
    finally:
        edge.terminate()
        edge.wait(30)
        server.stop()


async def _true(value: bool) -> bool:
    return value


async def _answers(client: openai.AsyncOpenAI) -> bool:
    try:
        await client.files.list()
        return True
    except (openai.APIStatusError, openai.APIConnectionError):
        return False


async def _queued_job_ids(url: str) -> set[str]:
    """The ``Nats-Msg-Id`` (= job id) of every message in the training queue."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(names.TRAIN_STREAM)
        ids = set()
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(names.TRAIN_STREAM, seq)
            ids.add(msg.headers["Nats-Msg-Id"])
        return ids
    finally:
        await nc.close()
