"""``python -m services.cli up`` as a process: ready banner, ordered shutdown, a dying child.

The launcher's behaviour only (signals, order, exit status, pid file); what the platform
answers is the business of the edge/scheduler/engine tests.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from services.common.model_store import DEFAULT_MODEL_ID
from tests.support import free_port

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.e2e]


class Launcher:
    """A running ``cy up`` with its output in files (a pipe nobody reads would stall it)."""

    def __init__(self, state_dir: Path, default_model_dir: Path) -> None:
        # Reuse the converted default model instead of converting it again for this state dir.
        models = state_dir / "models"
        models.mkdir(parents=True)
        (models / DEFAULT_MODEL_ID).symlink_to(default_model_dir, target_is_directory=True)
        self.state_dir = state_dir
        self.out = state_dir / "up.out"
        self.err = state_dir / "up.err"
        self.port = free_port()
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "up", "--port", str(self.port), "--nats-port", "-1",
                 "--state-dir", str(state_dir), "--quiet", "--ready-timeout", "90"],
                cwd=REPO, stdout=out, stderr=err, stdin=subprocess.DEVNULL)

    def stderr(self) -> str:
        """What the launcher has reported so far."""
        return self.err.read_text()

    def wait_for_banner(self, timeout: float = 120) -> None:
        """Wait until the launcher prints that everything is up."""
        deadline = time.monotonic() + timeout
        while "CY-LLM is up." not in self.out.read_text():
            assert self.proc.poll() is None, f"cy up exited with {self.proc.returncode}:\n{self.stderr()}"
            assert time.monotonic() < deadline, f"no banner after {timeout} s:\n{self.stderr()}"
            time.sleep(0.2)

    def child_pids(self) -> dict[str, int]:
        """Service name -> pid, from the launcher's ``started <name> (pid N`` lines."""
        return {m[0]: int(m[1]) for m in re.findall(r"started (\w+) \(pid (\d+)", self.stderr())}

    def stop(self) -> None:
        """Make sure nothing is left behind, whatever the test did."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for pid in self.child_pids().values():
            if psutil.pid_exists(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def launcher(tmp_path: Path, default_model_dir: Path):
    """``cy up`` in a temp state dir on free ports."""
    up = Launcher(tmp_path / "state", default_model_dir)
    try:
        yield up
    finally:
        up.stop()


def test_up_serves_then_stops_everything_in_order_on_sigint(launcher: Launcher):
    launcher.wait_for_banner()
    banner = launcher.out.read_text()
    assert f"http://127.0.0.1:{launcher.port}/v1" in banner and "curl" in banner and "OpenAI(" in banner
    assert (launcher.state_dir / "cy-up.pid").read_text().strip() == str(launcher.proc.pid)
    pids = launcher.child_pids()
    assert set(pids) == {"engine", "scheduler", "trainer", "edge"}
    # Every service froze its start-up heap, so full collections skip it (the trainer may start after the banner).
    deadline = time.monotonic() + 60
    for name in pids:
        log = launcher.state_dir / "logs" / f"{name}.log"
        while "heap frozen after start-up" not in log.read_text():
            assert time.monotonic() < deadline, f"{name}: {log.read_text()}"
            time.sleep(0.2)

    launcher.proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 30
    while "stopping edge" not in launcher.stderr():
        assert time.monotonic() < deadline, launcher.stderr()
        time.sleep(0.02)
    launcher.proc.send_signal(signal.SIGINT)  # a second Ctrl-C is acknowledged, not an error

    assert launcher.proc.wait(60) == 0, launcher.stderr()
    report = launcher.stderr()
    assert "SIGINT ignored: already shutting down" in report
    stops = [report.index(f"stopping {name}") for name in ("edge", "trainer", "scheduler", "engine")]
    assert stops == sorted(stops), report
    assert report.index("stopping nats-server") > stops[-1]
    assert "Traceback" not in report
    assert not any(psutil.pid_exists(pid) for pid in pids.values())
    assert not (launcher.state_dir / "cy-up.pid").exists()
    for name in ("engine", "scheduler", "trainer", "edge", "nats"):
        assert (launcher.state_dir / "logs" / f"{name}.log").stat().st_size > 0


def test_a_dying_child_is_reported_and_the_rest_is_stopped(launcher: Launcher):
    launcher.wait_for_banner()
    pids = launcher.child_pids()

    os.kill(pids["engine"], signal.SIGKILL)

    assert launcher.proc.wait(60) == 1
    report = launcher.stderr()
    log = launcher.state_dir / "logs" / "engine.log"
    assert f"engine exited unexpectedly (killed by SIGKILL); its log: {log}" in report
    assert "stopping edge" in report and "stopping scheduler" in report and "stopping nats-server" in report
    assert not any(psutil.pid_exists(pid) for pid in pids.values())
