"""``./cy train``: against an in-process edge, with the test playing the trainer on the bus."""

from __future__ import annotations

import asyncio

import pytest

from schemas.training import RUNNING, SUCCEEDED
from services.cli.main import build_parser, main
from services.cli.train import progress_line
from tests.training_harness import BASE_MODEL, DATASET, edge, trainer, training_config  # noqa: F401 - fixtures


def _cy(*argv: str):
    """Run ``cy`` in a thread (it runs its own event loop), as a separate process would."""
    return asyncio.to_thread(main, list(argv))


async def test_start_follow_shows_progress_and_exits_0_when_the_job_succeeds(edge, trainer, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_bytes(DATASET)
    url = str(edge.make_url(""))
    cli = asyncio.create_task(_cy("train", "start", "--model", BASE_MODEL, "--file", str(data), "--epochs", "1",
                                  "--method", "dora", "--suffix", "cli", "--follow", "--url", url))
    job = await trainer.take(timeout=20)
    assert job.model == BASE_MODEL and job.peft.method == "dora" and job.hyperparameters.n_epochs == 1
    assert job.suffix == "cli" and job.training_file.startswith("file-")
    await trainer.status(job.id, RUNNING)
    for step in (1, 2, 3, 4):
        await trainer.step(job.id, step, 4, loss=1.0 / step)
    await trainer.status(job.id, SUCCEEDED, fine_tuned_model=f"{BASE_MODEL}:ft-cli")
    assert await asyncio.wait_for(cli, 20) == 0
    out = capsys.readouterr().out
    assert f"started {job.id}" in out
    assert "step 2/4   50.0%" in out and "loss 0.2500" in out
    assert f"{job.id} succeeded: fine-tuned model {BASE_MODEL}:ft-cli" in out


async def test_follow_exits_3_when_the_job_is_cancelled_and_list_status_show_it(edge, trainer, capsys):
    url = str(edge.make_url(""))
    started = await (await edge.post("/api/v1/training/start", json={
        "baseModel": BASE_MODEL, "datasetPath": "/d.jsonl"})).json()
    job_id = started["jobId"]
    follow = asyncio.create_task(_cy("train", "follow", job_id, "--url", url))
    await trainer.status(job_id, RUNNING)
    await trainer.step(job_id, 5, 10, loss=0.75)
    assert await _cy("train", "status", job_id, "--url", url) == 0
    assert await _cy("train", "list", "--url", url) == 0
    assert await _cy("train", "cancel", job_id, "--url", url) == 0
    assert await asyncio.wait_for(follow, 20) == 3
    out = capsys.readouterr().out
    assert "step:        5 of 10 (50.0%)" in out and "loss:        0.7500" in out
    assert job_id in out and "running" in out
    assert f"{job_id}: cancelled" in out and f"{job_id} was cancelled" in out


async def test_errors_are_reported_plainly(edge, capsys, tmp_path):
    url = str(edge.make_url(""))
    assert await _cy("train", "status", "ftjob-missing", "--url", url) == 1
    assert "HTTP 404" in capsys.readouterr().err
    assert await _cy("train", "start", "--model", BASE_MODEL, "--file", str(tmp_path / "none.jsonl"),
                     "--url", url) == 1
    assert "no such file" in capsys.readouterr().err
    assert await _cy("train", "list", "--url", "http://127.0.0.1:9") == 1
    assert "cannot reach the edge" in capsys.readouterr().err


def test_help_lists_the_actions(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    help_text = capsys.readouterr().out
    for action in ("start", "list", "status", "follow", "cancel"):
        assert action in help_text


def test_progress_line():
    line = progress_line({"step": 3, "total_steps": 4, "epoch": 0.75, "train_loss": 0.5, "eta_s": 65})
    assert line == "[##################......]  step 3/4   75.0%  epoch 0.75  loss 0.5000  ETA 0:01:05"
