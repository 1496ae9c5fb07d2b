"""``./cy up --nats-cluster 3``: three routed nodes, everything at R3, the services on all three; ``./cy down``."""

from __future__ import annotations

import re
import subprocess
import sys

import aiohttp
import nats
import psutil
import pytest

from infra import provision
from schemas import names
from services.common.model_store import DEFAULT_MODEL_ID
from tests.support import REPO, CyUp, state_dir_with_models

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _node_processes(state) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(str(state / "nats-cluster") in part for part in proc.info["cmdline"] or []):
            found.append(proc)
    return found


async def test_up_on_three_nodes_serves_at_r3_and_down_stops_services_then_nodes(tmp_path, default_model_dir):
    state = state_dir_with_models(tmp_path, default_model_dir)
    up = CyUp(state, "--nats-cluster", "3", "--nats-port", "-1", "--no-trainer", "--metrics-port", "0")
    try:
        up.wait_ready()
        banner = up.output()
        nodes = re.findall(r"^ +(nats://127\.0\.0\.1:\d+)$", banner, re.M)
        assert "3-node cluster, streams and buckets R3" in banner and len(nodes) == 3, banner
        assert len(_node_processes(state)) == 3

        nc = await nats.connect(nodes)
        try:
            js = nc.jetstream()
            defs = provision.load_definitions()
            for stream in [*defs["streams"], *(f"KV_{b}" for b in defs["kv"])]:
                assert (await js.stream_info(stream)).config.num_replicas == 3, stream
            consumer = await js.consumer_info(names.INFER_STREAM, next(iter(defs["consumers"])))
            assert consumer.config.num_replicas == 3
        finally:
            await nc.close()

        async with aiohttp.ClientSession() as http:
            body = {"model": DEFAULT_MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                    "cache": False}
            async with http.post(f"{up.url}/v1/chat/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["choices"][0]["message"]["content"]

        down = subprocess.Popen([sys.executable, "-m", "services.cli", "down", "--state-dir", str(state)], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert up.proc.wait(60) == 0  # reaped here: ./cy down waits until the launcher's pid is gone
        assert down.wait(60) == 0, down.stdout.read()
        report = up.output()
        stops = [report.index(f"stopping {name}") for name in ("edge", "scheduler", "engine")]
        assert stops == sorted(stops) and report.index("stopping the 3 nats-server nodes") > stops[-1], report
        assert _node_processes(state) == []
    finally:
        up.stop()
        for proc in _node_processes(state):
            proc.kill()
