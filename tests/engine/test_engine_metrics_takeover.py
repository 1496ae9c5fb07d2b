"""``--metrics-port-takeover``: an engine started while its metrics port is still held (by the engine it
replaces, in ``./cy up``'s engine switch) serves meanwhile and takes the port over once it is free."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid

import aiohttp
import msgspec
import pytest
from prometheus_client import CollectorRegistry

from schemas import names
from schemas.events import StreamEnd
from schemas.heartbeat import EngineHeartbeat
from schemas.inference import ChatMessage, InferenceRequest, SamplingParams
from services.common import metrics_http
from services.engine.config import parse_args
from tests.engine.test_engine_service import dispatch, events_until_terminal
from tests.support import REPO, counter_total, free_port, wait_for


async def _get(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return await resp.text()


def test_takeover_needs_a_metrics_port_and_is_documented(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--nats-url", "nats://h:1", "--model-id", "m", "--metrics-port-takeover"])
    assert "--metrics-port-takeover needs --metrics-port" in capsys.readouterr().err
    assert parse_args(["--model-id", "m", "--metrics-port", "9", "--metrics-port-takeover"]).metrics_port_takeover
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "--metrics-port-takeover" in capsys.readouterr().out
    assert "--metrics-port-takeover" in (REPO / "docs" / "engines.md").read_text()


async def test_an_engine_serves_while_its_port_is_held_then_takes_it_over_with_its_own_counts(
        nc, nats_server, tmp_path):
    worker = f"w-{uuid.uuid4().hex[:8]}"
    port = free_port()
    holder = metrics_http.serve("127.0.0.1", port, CollectorRegistry(), lambda: (True, {"worker": "old-engine"}))
    beats = await nc.subscribe(names.worker_status(worker))
    log = (tmp_path / "engine.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "services.engine", "--nats-url", nats_server.url, "--engine",
                             "simulated", "--model-id", "sim", "--worker-id", worker, "--heartbeat-interval", "0.2",
                             "--metrics-port", str(port), "--metrics-port-takeover"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        msgspec.json.decode((await beats.next_msg(timeout=60)).data, type=EngineHeartbeat)
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        req = InferenceRequest(id=f"r-{uuid.uuid4().hex[:8]}", model="sim", reply_to=inbox, cache=False,
                               messages=[ChatMessage(role="user", content="one two three four")],
                               sampling=SamplingParams(max_tokens=6))
        assert (await dispatch(nc, worker, req)).accepted
        end = (await events_until_terminal(sub))[-1]
        assert isinstance(end, StreamEnd) and end.usage.completion_tokens > 0
        # The engine serves while the old holder keeps the port (and still answers on it).
        assert json.loads(await _get(f"http://127.0.0.1:{port}/healthz")) == {"worker": "old-engine"}
        assert proc.poll() is None
        holder.shutdown()
        holder.server_close()

        async def taken_over() -> bool:
            try:
                return json.loads(await _get(f"http://127.0.0.1:{port}/healthz")).get("worker") == worker
            except aiohttp.ClientError:
                return False

        assert await wait_for(taken_over, 30), (tmp_path / "engine.log").read_text()
        metrics = await _get(f"http://127.0.0.1:{port}/metrics")
        assert counter_total(metrics, "generated_tokens_total") == end.usage.completion_tokens
    finally:
        holder.shutdown()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        log.close()
