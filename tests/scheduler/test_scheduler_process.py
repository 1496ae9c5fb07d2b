"""``python -m services.scheduler`` as a real process: serves metrics and status, drains on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import aiohttp
import nats.errors

from services.scheduler.status import STATUS_SUBJECT
from tests.scheduler.test_scheduler_harness import engines, eventually, new_request, submit, until_stream_holds  # noqa: F401
from tests.support import free_port, log_shows

REPO = Path(__file__).resolve().parents[2]


async def _wait_ready(nc, proc: asyncio.subprocess.Process, worker: str) -> None:
    """Until the scheduler's status endpoint lists ``worker``."""
    async with asyncio.timeout(15):
        while True:
            assert proc.returncode is None, "the scheduler exited during start-up"
            try:
                status = json.loads((await nc.request(STATUS_SUBJECT, b"", timeout=0.5)).data)
                if worker in [w["worker"] for w in status["workers"]]:
                    return
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                pass
            await asyncio.sleep(0.05)


async def _metrics_with(port: int, line: str) -> str:
    """The scraped metrics page, once it contains ``line`` (fails after 3 s)."""
    text = ""
    async with aiohttp.ClientSession() as session, asyncio.timeout(3):
        while line not in text:
            await asyncio.sleep(0.02)
            async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                text = await resp.text()
    return text


async def test_process_dispatches_serves_metrics_and_finishes_dispatches_on_sigterm(nats_server, nc, engines,
                                                                                    tmp_path):
    engine = await engines("proc", slots=4)
    port = free_port()
    log_path = tmp_path / "scheduler.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.scheduler", "--nats-url", nats_server.url, "--metrics-port", str(port),
            cwd=REPO, stdout=log, stderr=log)
    try:
        await _wait_ready(nc, proc, engine.worker)
        first = await submit(nc, new_request())
        await eventually(lambda: engine.received_ids == [first.id], what="the first dispatch")
        # Counted once the engine's answer is back at the scheduler, a moment after the engine saw it.
        text = await _metrics_with(port, 'llm_scheduler_inference_requests_total{lane="normal",outcome="dispatched"} 1.0')
        assert "llm_scheduler_workers_healthy 1.0" in text

        engine.release = asyncio.Event()  # the next dispatch waits for the engine's answer until the test says
        second = await submit(nc, new_request())
        await eventually(lambda: engine.dispatch_requests == 2, what="the second dispatch to reach the engine")
        proc.send_signal(signal.SIGTERM)
        assert await log_shows(log_path, "signal SIGTERM: shutting down")
        proc.send_signal(signal.SIGTERM)  # a second signal changes nothing
        assert await log_shows(log_path, "already shutting down")
        assert proc.returncode is None, "exited before its dispatch under way had finished"
        engine.release.set()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert engine.received_ids == [first.id, second.id]
        await until_stream_holds(nc, 0)  # acknowledged before exiting, not left for redelivery
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    output = log_path.read_text()
    assert "already shutting down" in output and "Traceback" not in output


async def test_process_refuses_to_start_without_provisioned_consumers(nats_server, tmp_path):
    # nats_server alone is bare: no stream, no consumers (the scheduler must never create them).
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.scheduler", "--nats-url", nats_server.url, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 1
    assert b"schedulers_high" in out and b"missing" in out


async def test_process_stops_on_sigterm_while_nats_is_unreachable(tmp_path):
    log_path = tmp_path / "scheduler.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.scheduler", "--nats-url", f"nats://127.0.0.1:{free_port()}", cwd=REPO,
            stdout=log, stderr=log)
    try:
        assert await log_shows(log_path, "NATS error")  # it tried to connect and is retrying
        assert proc.returncode is None
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 5) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
