"""Test support: start the platform as real processes, the way users and operators do."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from services.common.natsserver import free_ports

REPO = Path(__file__).resolve().parents[1]


def free_port(span: int = 1) -> int:
    """A loopback TCP port free a moment ago (the first of ``span`` free ones), outside the range
    outgoing connections take their ports from (``natsserver.free_ports``)."""
    return free_ports(1, span=span)[0]


def state_dir_with_models(tmp: Path, model_dir: Path) -> Path:
    """A fresh state directory that shares the already-converted model store (no re-conversion)."""
    state = tmp / "state"
    (state / "models").mkdir(parents=True)
    (state / "models" / model_dir.name).symlink_to(model_dir)
    return state


class CyUp:
    """``python -m services.cli up`` as a child process, stopped with SIGTERM (like Ctrl-C)."""

    def __init__(self, state_dir: Path, *extra: str) -> None:
        self.state_dir = state_dir
        self.port = free_port()
        self.nats_port = free_port()
        self.metrics_port = free_port(span=3)  # the scheduler's; engine and trainer take the next two
        self.url = f"http://127.0.0.1:{self.port}"
        self.nats_url = f"nats://127.0.0.1:{self.nats_port}"
        self.log = state_dir / "cy-up.out"
        argv = [sys.executable, "-m", "services.cli", "up", "--port", str(self.port), "--nats-port",
                str(self.nats_port), "--metrics-port", str(self.metrics_port), "--state-dir", str(state_dir),
                "--quiet", *extra]
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})

    def nkey(self, identity: str) -> str:
        """The seed file ``up`` made for bus ``identity`` (``producer``, ``operator``, ...)."""
        return str(self.state_dir / "nats" / "nkeys" / f"{identity}.nk")

    async def nats_connect(self, identity: str):
        """A NATS client authenticated as ``identity``, its inboxes under the identity's own root."""
        import nats

        return await nats.connect(self.nats_url, nkeys_seed=self.nkey(identity), inbox_prefix=f"_INBOX.{identity}")

    def bus_refusals(self) -> list[str]:
        """The permission violations the embedded nats-server logged (a service denied something)."""
        log = self.state_dir / "logs" / "nats.log"
        return [line for line in log.read_text(errors="replace").splitlines() if "Violation" in line]

    def output(self) -> str:
        """Everything ``up`` printed so far."""
        return self.log.read_text(errors="replace")

    async def generated_tokens(self) -> float:
        """Completion tokens the engine has generated so far, from its own Prometheus counter.

        A response replayed from the prompt cache adds nothing to it, so a test comparing two answers
        reads it before and after to prove both were really generated.
        """
        port = self.metrics_port + 1  # ``up`` gives the engine the port after the scheduler's
        assert f"engine :{port}" in self.output(), "the engine serves no metrics (its port was busy)"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                return counter_total(await resp.text(), "generated_tokens_total")

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Block until ``up`` printed its ready banner; fail with its output if it died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "CY-LLM is up." in self.output():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"cy up exited with {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.2)
        raise TimeoutError(f"cy up was not ready within {timeout}s:\n{self.output()}")

    def __enter__(self) -> "CyUp":
        """Wait until it serves (a failed start still stops it)."""
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        """Stop it, as Ctrl-C would; it must exit cleanly."""
        code = self.stop()
        assert code == 0, f"cy up did not stop cleanly (exit {code}):\n{self.output()[-3000:]}"

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise


def frozen_minute():
    """A wall clock stopped one second into the current minute, for ``create_app(rate_clock=...)``: per-minute
    rate budgets counted on it never reset in the middle of a test (no waiting for a minute boundary)."""
    start = (time.time() // 60) * 60 + 1.0
    return lambda: start


def counter_total(exposition: str, suffix: str) -> float:
    """The sum of every sample whose name ends with ``suffix`` in a Prometheus text exposition (by suffix:
    the service prefix of a metric's name may change, its noun and unit do not)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(sample.value for family in text_string_to_metric_families(exposition)
               for sample in family.samples if sample.name.endswith(suffix))


async def sse_events(resp: aiohttp.ClientResponse) -> list[bytes]:
    """All ``data:`` payloads of an SSE response, in order."""
    out = []
    async for raw in resp.content:
        line = raw.strip()
        if line.startswith(b"data: "):
            out.append(line[6:])
    return out


async def log_shows(path: Path, text: str, timeout: float = 15.0) -> bool:
    """Wait until the log file at ``path`` contains ``text`` (a process said it reached a point); whether it did."""
    async def shows() -> bool:
        return path.exists() and text in path.read_text(errors="replace")

    return await wait_for(shows, timeout=timeout)


async def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll an async predicate until true or ``timeout``; its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        if await predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)
