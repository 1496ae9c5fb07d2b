"""Many sites: a site's engine, connected only to the site's NATS leaf node, serves requests submitted at the hub.

The hub is a JetStream node with the edge and a scheduler; the site runs a leaf node without
JetStream (the hub's streams, KV buckets and object store are reached through the leaf, in the
same account) and an engine that knows only the leaf's address. The leaf connects to the hub as
the site's own user (``bus_permissions.leaf_site``: what the site's engines may do, nothing more),
and authenticates its local engine as that engine's user. On loopback, as docs/scaling.md says.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import psutil
import pytest

from services.cli import nats_auth, sites
from services.cli.infra import apply_definitions
from services.cli.up import NATS_CONFIG
from services.common import bus_auth, bus_permissions
from services.common.natsserver import NatsServer, free_ports, nats_server_binary
from tests.support import REPO, free_port, log_shows, sse_events, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SITE, WORKER, MODEL, DOMAIN = "site-a", "site-a-engine", "site-model", "hub"


def _service(argv: list[str], log: Path, state: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CY_", "NATS_"))}
    return subprocess.Popen([sys.executable, "-m", *argv], cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env=env | {"PYTHONUNBUFFERED": "1", "CY_STATE_DIR": str(state)}, start_new_session=True)


async def _chat(http: aiohttp.ClientSession, url: str, stream: bool) -> dict | list[bytes]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello from the hub"}], "max_tokens": 6,
            "stream": stream, "cache": False}
    async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await sse_events(resp) if stream else await resp.json()


async def test_a_site_engine_behind_a_leaf_node_serves_the_hub(tmp_path: Path):
    operator_dir = tmp_path / "operator"
    identities = nats_auth.prepare("nkeys", operator_dir, [WORKER])
    hub_leaf_port, leaf_port = free_ports(2)
    # The operator's command: the leaf node's config (engine users, mappings, remote) and the hub's user for it.
    made = subprocess.run([sys.executable, "-m", "services.cli", "nats", "site", SITE, "--worker", WORKER,
                           "--hub", f"nats-leaf://127.0.0.1:{hub_leaf_port}", "--hub-domain", DOMAIN,
                           "--listen", f"127.0.0.1:{leaf_port}", "--state-dir", str(operator_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    leaf_conf = sites.leaf_config_path(operator_dir, SITE)
    assert str(leaf_conf) in made.stdout and f"domain: {DOMAIN}" in made.stdout
    site = bus_permissions.leaf_site(SITE, [WORKER], DOMAIN)
    site_key = bus_auth.public_key(bus_auth.seed_path(bus_auth.nkeys_dir(operator_dir), site.identity))
    assert site_key in made.stdout
    # The hub's JetStream gets a domain: the site reaches it as $JS.hub.API (see site_mappings).
    base = tmp_path / "hub-base.conf"
    base.write_text(NATS_CONFIG.read_text().replace("sync_interval: always",
                                                    f"sync_interval: always\n  domain: {DOMAIN}"))
    hub_config = bus_auth.write_server_config(base, tmp_path / "hub" / "hub.conf", identities.seeds,
                                              identities.permissions, {site_key: site})
    hub = NatsServer(tmp_path / "hub", config=hub_config, log_file=tmp_path / "hub.log",
                     node_config=f"leafnodes {{\n  listen: \"127.0.0.1:{hub_leaf_port}\"\n}}\n").start()
    leaf_log = tmp_path / "leaf.log"
    procs = [subprocess.Popen([nats_server_binary(), "-c", str(leaf_conf)], stdout=leaf_log.open("wb"),
                              stderr=subprocess.STDOUT, start_new_session=True)]
    try:
        operator = str(identities.seeds[bus_permissions.OPERATOR])
        await apply_definitions(hub.url, nkey=operator)
        assert await log_shows(leaf_log, "Leafnode connection created", timeout=30), leaf_log.read_text()
        port = free_port()

        def bus(identity: str, url: str) -> list[str]:
            return ["--nats-url", url, "--nats-nkey", str(identities.seeds[identity])]

        engine = f"{bus_permissions.ENGINE}.{WORKER}"
        procs += [
            _service(["services.engine", "--engine", "simulated", "--model-id", MODEL, "--worker-id", WORKER,
                      *bus(engine, f"nats://127.0.0.1:{leaf_port}")], tmp_path / "engine.log", tmp_path / "site"),
            _service(["services.scheduler", *bus(bus_permissions.SCHEDULER, hub.url)], tmp_path / "scheduler.log",
                     tmp_path / "hub-state"),
            _service(["services.edge", "--port", str(port), *bus(bus_permissions.EDGE, hub.url)],
                     tmp_path / "edge.log", tmp_path / "hub-state"),
        ]
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            async def lists_the_site_model() -> bool:
                assert all(p.poll() is None for p in procs), (tmp_path / "engine.log").read_text()[-2000:]
                try:
                    async with http.get(f"{url}/healthz") as resp:
                        return resp.status == 200 and MODEL in (await resp.json())["models"]
                except aiohttp.ClientError:
                    return False

            assert await wait_for(lists_the_site_model, timeout=60, interval=0.2), (tmp_path / "edge.log").read_text()
            answer = await _chat(http, url, stream=False)
            assert answer["model"] == MODEL and answer["choices"][0]["message"]["content"]
            assert answer["usage"]["completion_tokens"] > 0
            events = await _chat(http, url, stream=True)
            assert events[-1] == b"[DONE]" and len(events) > 2
        # The engine's only connections are to the leaf; nobody was refused anything on either server.
        peers = {c.raddr.port for c in psutil.Process(procs[1].pid).net_connections("tcp") if c.raddr}
        assert peers == {leaf_port}, peers
        refusals = [line for path in (tmp_path / "hub.log", leaf_log)
                    for line in path.read_text(errors="replace").splitlines() if "Violation" in line]
        assert not refusals, refusals
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        hub.stop()
