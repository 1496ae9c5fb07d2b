"""The operator CLI as a user runs it: ``python -m services.cli ...`` in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nats
from nats.js import api

from infra import provision
from schemas import names
from tests.support import free_port

REPO = Path(__file__).resolve().parents[2]


def cy(*args: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    """Run the CLI like ./cy does (after its install step), capturing its output."""
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def test_help_lists_every_command():
    result = cy("--help")

    assert result.returncode == 0
    for command in ("up", "down", "infra", "model", "test"):
        assert f"    {command} " in result.stdout
    assert "./cy up" in result.stdout


def test_up_help_documents_its_options():
    result = cy("up", "--help")

    assert result.returncode == 0
    for option in ("--port", "--host", "--nats-port", "--nats-url", "--state-dir", "--engine", "--slots"):
        assert option in result.stdout
    assert "no authentication" in result.stdout


def test_an_unknown_command_is_a_usage_error():
    result = cy("upp")

    assert result.returncode == 2
    assert "invalid choice: 'upp'" in result.stderr


def test_infra_apply_twice_creates_then_changes_nothing(nats_server):
    first = cy("infra", "apply", "--nats-url", nats_server.url)
    second = cy("infra", "apply", "--nats-url", nats_server.url)

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    first_lines = first.stdout.splitlines()
    assert any(line.split()[:3] == ["stream", names.INFER_STREAM, "created"] for line in first_lines)
    assert all(line.split()[2] == "created" for line in first_lines)
    second_lines = second.stdout.splitlines()
    assert len(second_lines) == len(first_lines)
    assert all(line.split()[2] == "unchanged" for line in second_lines)


async def test_infra_apply_refuses_a_conflicting_server_with_status_2(nats_server):
    nc = await nats.connect(nats_server.url)
    try:
        await nc.jetstream().add_stream(api.StreamConfig(
            name=names.INFER_STREAM, subjects=[names.INFER_SUBMIT_ALL], retention=api.RetentionPolicy.WORK_QUEUE,
            max_msgs=7, discard=api.DiscardPolicy.NEW, max_age=3600))
    finally:
        await nc.close()

    result = cy("infra", "apply", "--nats-url", nats_server.url)

    assert result.returncode == 2
    assert "LLM_INFER" in result.stderr and "max_msgs: server has 7" in result.stderr
    assert "--update" in result.stderr
    updated = cy("infra", "apply", "--nats-url", nats_server.url, "--update")
    assert updated.returncode == 0, updated.stderr
    assert any(line.split()[1:3] == [names.INFER_STREAM, "updated"] for line in updated.stdout.splitlines())


def test_infra_apply_without_a_server_says_so():
    url = f"nats://127.0.0.1:{free_port()}"

    result = cy("infra", "apply", "--nats-url", url)

    assert result.returncode == 1
    assert f"cannot connect to NATS at {url}" in result.stderr
    assert "Traceback" not in result.stderr


def test_down_with_nothing_running_says_so(tmp_path: Path):
    result = cy("down", "--state-dir", str(tmp_path))

    assert result.returncode == 0
    assert f"nothing is running (no pid file at {tmp_path / 'cy-up.pid'})" in result.stdout


def test_down_removes_a_stale_pid_file(tmp_path: Path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "cy-up.pid").write_text(gone.stdout)

    result = cy("down", "--state-dir", str(tmp_path))

    assert result.returncode == 0
    assert "removed the stale pid file" in result.stdout
    assert not (tmp_path / "cy-up.pid").exists()


def test_test_command_runs_pytest_with_the_given_arguments_and_its_status(tmp_path: Path):
    (tmp_path / "test_sample.py").write_text("def test_passes():\n    pass\n\ndef test_fails():\n    assert 1 == 2\n")
    args = ("test", str(tmp_path / "test_sample.py"), "-p", "no:cacheprovider", "-q")

    passing = cy(*args, "-k", "passes", timeout=120)
    failing = cy(*args, "-x", timeout=120)

    assert passing.returncode == 0, passing.stdout + passing.stderr
    assert "1 passed, 1 deselected" in passing.stdout
    assert failing.returncode == 1
    assert "1 failed" in failing.stdout


def test_run_becomes_the_service_with_its_own_options():
    result = cy("run", "scheduler", "--help")

    assert result.returncode == 0
    assert "python -m services.scheduler" in result.stdout and "--nats-url URL[,URL...]" in result.stdout
    assert cy("run", "nonsense").returncode == 2


async def test_run_engine_on_a_server_list_heart_beats(nats_server, tmp_path: Path):
    client = await nats.connect(nats_server.url)
    try:
        await provision.apply(client.jetstream())
        heartbeats = await client.subscribe(names.WORKER_STATUS_ALL)
        servers = f"nats://127.0.0.1:{free_port()},{nats_server.url}"
        log = (tmp_path / "engine.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "run", "engine", "--nats-url", servers,
                                 "--engine", "simulated", "--model-id", "sim", "--worker-id", "run-test"],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            beat = await heartbeats.next_msg(timeout=60)
            assert b"run-test" in beat.data, (tmp_path / "engine.log").read_text()
        finally:
            proc.terminate()
            assert proc.wait(30) == 0
    finally:
        await client.close()
