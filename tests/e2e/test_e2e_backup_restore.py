"""All platform state survives ``./cy backup``, a wiped state directory and ``./cy restore``: the
fine-tuning job, its adapter (served, answering as before), the uploaded file, an API key and a
registered model. A corrupted backup is refused and restores nothing."""

from __future__ import annotations

import asyncio
import io
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec
import nats
import openai
import pytest

from schemas import names
from services.common import model_registry
from services.common.model_registry import ModelEntry
from services.common.model_store import DEFAULT_MODEL_ID
from tests.e2e.test_e2e_fine_tune import ANSWER, QUESTIONS, dataset
from tests.support import REPO, CyUp, free_port, state_dir_with_models

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
QUESTION = [{"role": "user", "content": QUESTIONS[0]}]


def cy(*args: str) -> subprocess.CompletedProcess:
    """``./cy ARGS`` as an operator runs it (no terminal: plain progress lines)."""
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


async def fine_tune(client: openai.AsyncOpenAI) -> tuple[str, object]:
    """Upload the dataset and run a job to ``succeeded``; (file id, job)."""
    uploaded = await client.files.create(file=("zorbia.jsonl", io.BytesIO(dataset())), purpose="fine-tune")
    job = await client.fine_tuning.jobs.create(
        model=DEFAULT_MODEL_ID, training_file=uploaded.id, suffix="backup", seed=7,
        hyperparameters={"n_epochs": 5, "batch_size": 4, "learning_rate_multiplier": 15},
        extra_body={"peft": {"method": "lora", "r": 16, "alpha": 32}})
    deadline = time.monotonic() + 400  # a job stuck in one state fails the test instead of hanging it
    while job.status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job still {job.status}"
        await asyncio.sleep(1)
        job = await client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error
    return uploaded.id, job


async def ask(client: openai.AsyncOpenAI, model: str) -> str:
    reply = await client.chat.completions.create(model=model, messages=QUESTION, max_tokens=20, temperature=0,
                                                 extra_body={"cache": False})
    return reply.choices[0].message.content


async def registry_entry(up: CyUp, model_id: str) -> ModelEntry | None:
    nc = await up.nats_connect("operator")
    try:
        return await model_registry.get_entry(await nc.jetstream().key_value(names.MODELS_BUCKET), model_id)
    finally:
        await nc.close()


@pytest.mark.timeout(900)  # two start-ups of the platform and a fine-tuning run on a shared CPU
async def test_backup_wipe_restore_keeps_every_kind_of_state(tmp_path: Path, default_model_dir: Path):
    extra_model = ModelEntry(id="backup-check-model", source=str(default_model_dir), aliases=["backup-alias"])
    backup_dir = tmp_path / "backup"
    first_state = state_dir_with_models(tmp_path / "first", default_model_dir)
    with CyUp(first_state) as up:
        async with openai.AsyncOpenAI(base_url=f"{up.url}/v1", api_key="unused", max_retries=0) as client:
            file_id, job = await fine_tune(client)
            answer = await ask(client, job.fine_tuned_model)
        created = cy("keys", "create", "--name", "ops", "--scope", "inference", "--scope", "training",
                     "--nats-url", up.nats_url, "--nats-nkey", up.nkey("operator"))
        assert created.returncode == 0, created.stderr
        key = created.stdout.split()[0]
        nc = await up.nats_connect("operator")
        await model_registry.put_entry(await nc.jetstream().key_value(names.MODELS_BUCKET), extra_model)
        await nc.close()

        backed_up = cy("backup", str(backup_dir), "--nats-url", up.nats_url, "--nats-nkey", up.nkey("operator"))
        assert backed_up.returncode == 0, backed_up.stderr
    assert "Quillhaven" in answer and ANSWER.startswith("The capital")

    shutil.rmtree(first_state)  # the machine is gone; only the backup is left
    second_state = state_dir_with_models(tmp_path / "second", default_model_dir)
    restored = cy("restore", str(backup_dir), "--state-dir", str(second_state))
    assert restored.returncode == 0, restored.stderr

    with CyUp(second_state) as up:
        async with openai.AsyncOpenAI(base_url=f"{up.url}/v1", api_key="unused", max_retries=0) as client:
            again = await client.fine_tuning.jobs.retrieve(job.id)
            assert (again.status, again.fine_tuned_model) == ("succeeded", job.fine_tuned_model)
            assert (await client.files.retrieve(file_id)).filename == "zorbia.jsonl"
            assert (await client.files.content(file_id)).content == dataset()
            assert job.fine_tuned_model in [m.id for m in (await client.models.list()).data]
            assert await ask(client, job.fine_tuned_model) == answer  # the same adapter weights, served again
        assert await registry_entry(up, extra_model.id) == extra_model
        # The restored key authenticates at an edge that requires keys; another does not.
        with edge_requiring_keys(up, tmp_path / "keys-edge.log") as url:
            async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0) as client:
                assert (await client.files.retrieve(file_id)).id == file_id
            async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-not-a-key", max_retries=0) as stranger:
                with pytest.raises(openai.AuthenticationError):
                    await stranger.files.retrieve(file_id)


@contextmanager
def edge_requiring_keys(up: CyUp, log: Path) -> Iterator[str]:
    """One more edge on the platform's NATS (as the bus's edge identity), with ``--auth keys``; its URL once it answers."""
    port = free_port()
    edge = subprocess.Popen([sys.executable, "-m", "services.edge", "--nats-url", up.nats_url, "--port", str(port),
                             "--nats-nkey", up.nkey("edge"), "--auth", "keys"], cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2):
                    break
            except urllib.error.HTTPError:
                break  # it answers (unhealthy or not, it is listening)
            except OSError:
                assert edge.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        yield url
    finally:
        edge.terminate()
        edge.wait(30)


def test_a_corrupted_backup_restores_nothing(tmp_path: Path, default_model_dir: Path, nats_server):
    backup_dir = tmp_path / "backup"
    nc_url = nats_server.url

    async def provision_and_fill() -> None:
        from infra import provision

        nc = await nats.connect(nc_url)
        await provision.apply(nc.jetstream())
        await (await nc.jetstream().object_store(names.ARTIFACTS_STORE)).put("files/a", b"a" * 50_000)
        await nc.close()

    asyncio.run(provision_and_fill())
    assert cy("backup", str(backup_dir), "--nats-url", nc_url).returncode == 0
    snapshot = backup_dir / "streams" / f"{names.obj_stream(names.ARTIFACTS_STORE)}.snapshot"
    data = bytearray(snapshot.read_bytes())
    data[-1] ^= 0xFF
    snapshot.write_bytes(bytes(data))

    state = state_dir_with_models(tmp_path / "state", default_model_dir)
    refused = cy("restore", str(backup_dir), "--state-dir", str(state))

    assert refused.returncode == 1
    assert "is corrupted" in refused.stderr and "nothing restored" in refused.stderr
    assert not (state / "nats").exists()  # refused before any server was started or any stream written
    assert msgspec.json.decode((backup_dir / "manifest.json").read_bytes())["format"] == "cy-backup/1"
