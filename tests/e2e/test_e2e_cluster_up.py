"""``./cy up --nats-cluster 3``: three routed nodes, everything at R3, the services on all three; ``./cy down``.

The bus is authenticated (``--nats-auth nkeys``, the default) on every node: the same users
everywhere, and ``./cy keys create --nats`` gives every node the key's user at once. It runs over
TLS (``--nats-tls auto``): clients and routes, with the state dir's generated CA.
"""

from __future__ import annotations

import re
import ssl
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
        nodes = re.findall(r"^ +(tls://127\.0\.0\.1:\d+)$", banner, re.M)
        assert "3-node cluster, streams and buckets R3" in banner and len(nodes) == 3, banner
        ca = state / "nats" / "tls" / "ca.pem"
        assert f"--nats-tls-ca {ca}" in banner, banner
        assert len(_node_processes(state)) == 3

        with pytest.raises(ssl.SSLCertVerificationError):  # no CA: the TLS handshake fails
            await nats.connect(nodes[1], allow_reconnect=False, max_reconnect_attempts=0)
        tls = ssl.create_default_context(cafile=str(ca))
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(nodes[1], tls=tls, allow_reconnect=False, max_reconnect_attempts=0)  # no user
        nc = await nats.connect(nodes, tls=tls, nkeys_seed=up.nkey("operator"),
                                inbox_prefix=names.identity_inbox("operator"))
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

        await _key_user_joins_every_node(state, nodes, up.nkey("operator"), tls)
        logs = [state / "logs" / f"nats-n{i}.log" for i in (1, 2, 3)]
        assert not [line for log in logs for line in log.read_text().splitlines() if "Violation" in line]

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


async def _key_user_joins_every_node(state, nodes: list[str], operator: str, tls: ssl.SSLContext) -> None:
    """``./cy keys create --nats`` (trusting the state dir's CA without a flag) reloads every node: the
    key's user is let in by each one."""
    created = subprocess.run([sys.executable, "-m", "services.cli", "keys", "create", "--name", "bob", "--scope",
                              "inference", "--nats", "--state-dir", str(state), "--nats-url", ",".join(nodes),
                              "--nats-nkey", operator], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert created.returncode == 0, created.stderr
    assert "reloaded" in created.stdout, created.stdout
    seed = next(line for line in created.stdout.splitlines() if line.startswith("SU"))
    key_id = re.search(r"created key ([0-9a-f]{12})", created.stdout).group(1)
    for node in nodes:  # each node alone, so no node's refusal is hidden by a failover to another
        nc = await nats.connect(node, tls=tls, nkeys_seed_str=seed, inbox_prefix=names.identity_inbox(key_id),
                                allow_reconnect=False, max_reconnect_attempts=0)
        await nc.close()
