"""``python -m services.edge`` as a real process: serves HTTP, and on SIGTERM lets open streams finish."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import aiohttp

from schemas.events import StreamEnd, TokenDelta, Usage
from services.edge.config import parse_args
from tests.edge_harness import MODEL, chat_body, engine, sse_payloads  # noqa: F401 - fixtures
from tests.support import free_port, log_shows

REPO = Path(__file__).resolve().parents[2]


async def _wait_healthy(session: aiohttp.ClientSession, url: str, proc: asyncio.subprocess.Process) -> None:
    async with asyncio.timeout(15):
        while True:
            assert proc.returncode is None, "the edge exited during start-up"
            try:
                async with session.get(url) as resp:
                    if resp.status == 200 and MODEL in (await resp.json())["models"]:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)


async def test_cli_config_is_strict():
    config = parse_args(["--nats-url", "nats://h:1", "--port", "9000", "--request-timeout", "5"])
    assert (config.nats_url, config.port, config.request_timeout) == ("nats://h:1", 9000, 5.0)


async def test_process_serves_and_sigterm_lets_open_streams_finish(nats_server, engine, tmp_path):
    port = free_port()
    log_path = tmp_path / "edge.log"
    log = log_path.open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.edge", "--nats-url", nats_server.url, "--host", "127.0.0.1",
        "--port", str(port), "--shutdown-timeout", "10", cwd=REPO, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            await _wait_healthy(session, f"{base}/healthz", proc)
            post = asyncio.create_task(session.post(f"{base}/v1/chat/completions", json=chat_body(stream=True)))
            req = await engine.next_request()
            await engine.send(req, engine.start_event(req), TokenDelta(id=req.id, seq=1, text="before"))
            resp = await post
            first = await resp.content.readany()
            assert b"before" in first
            proc.send_signal(signal.SIGTERM)
            assert await log_shows(log_path, "edge shutting down")  # the signal was handled...
            assert proc.returncode is None  # ...and the edge is still finishing the open stream
            await engine.send(req, TokenDelta(id=req.id, seq=2, text=" after"),
                              StreamEnd(id=req.id, seq=3, finish_reason="stop",
                                        usage=Usage(prompt_tokens=1, completion_tokens=2)))
            payloads = sse_payloads((first + await resp.content.read()).decode())
            assert '" after"' in payloads[-3] and payloads[-1] == "[DONE]"
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()
