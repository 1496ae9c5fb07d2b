"""Many hosts: every part in its own network namespace, nothing shared but the bridge between them.

Three NATS nodes (a routed cluster, JetStream at R3), an edge, two schedulers and two engines each
run in a namespace of their own (``tests/netns_support.py``), with their own directory for state
and models and their own nkey seed, started the way a host runs one service (``python -m
services.<name>`` with ``--nats-url`` listing the three nodes' bridge addresses). The operator
provisions from the root namespace (``./cy infra apply``, which also publishes the default model's
weights); the transformers engine is given no model path and gets the model from the registry and
the object store into its own directory. The OpenAI SDK, in the root namespace, talks to the
edge's address and gets answers from both engines.

The bus runs as between real hosts: TLS for clients and routes (one CA, a node certificate valid
for the three bridge addresses, each host holding its own copy of the files it needs), route
authorization, and every service and operator command verifying the nodes with ``--nats-tls-ca``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from openai import OpenAI

from services.cli import nats_auth
from services.cli.infra import wait_for_jetstream
from services.cli.up import NATS_CONFIG
from services.common import bus_auth, bus_permissions, nats_tls
from services.common.bus import NatsOptions
from services.common.model_store import DEFAULT_GGUF, DEFAULT_MODEL_ID
from services.common.nats_tls import TlsFiles
from services.common.natsserver import nats_server_binary
from tests import netns_support
from tests.netns_support import Host, Hosts
from tests.support import REPO

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

WHY_NOT = netns_support.unavailable()
CLIENT_PORT, ROUTE_PORT, HTTP_PORT, METRICS_PORT = 4222, 6222, 8080, 9100
REAL_WORKER, SIM_WORKER, SIM_MODEL = "hosts-real", "hosts-sim", "hosts-simulated"


def tls_client_flags(host: Host, pki: TlsFiles) -> list[str]:
    """``--nats-tls-ca`` with the host's own copy of the CA certificate."""
    own = host.root / "nats-ca.pem"
    shutil.copyfile(pki.ca, own)
    return ["--nats-tls-ca", str(own)]


@pytest.fixture
def hosts(tmp_path: Path):
    """The bridge and namespaces of this test, removed after it whatever happens."""
    if WHY_NOT is not None:
        pytest.skip(f"network namespaces cannot be created here: {WHY_NOT}")
    with Hosts(tmp_path / "hosts") as made:
        yield made


def _clean_env(host: Host) -> dict[str, str]:
    """The host's environment: nothing of the launcher's bus or state settings, its own directories.

    Its own temporary directory too, as another machine has: there an edge makes its reply socket,
    which the engines on the other hosts then cannot open (their events cross the bus).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CY_", "NATS_"))}
    (host.root / "tmp").mkdir(parents=True, exist_ok=True)
    return env | {"PYTHONUNBUFFERED": "1", "CY_STATE_DIR": str(host.root / "state"), "HF_HOME": str(host.root / "hf"),
                  "TMPDIR": str(host.root / "tmp")}


def _own_seed(identities: nats_auth.BusIdentities, identity: str, host: Host) -> str:
    """A copy of ``identity``'s seed in the host's own directory (hosts share no file)."""
    target = host.root / "bus.nk"
    shutil.copyfile(identities.seeds[identity], target)
    target.chmod(0o600)
    return str(target)


def _start_nats(hosts: Hosts, identities: nats_auth.BusIdentities, pki_dir: Path) -> tuple[list[Host], TlsFiles]:
    """Three routed nodes with TLS (clients and routes) and route authorization; the CA's files."""
    nodes = [hosts.add(f"nats{i}") for i in (1, 2, 3)]
    pki = nats_tls.ensure_local_tls(pki_dir, [n.address for n in nodes])
    route_auth = nats_tls.ensure_route_auth(pki_dir)
    for node in nodes:
        own = TlsFiles(*(node.root / "tls" / f.name for f in (pki.ca, pki.cert, pki.key)))
        own.ca.parent.mkdir(mode=0o700)
        for src, dst in zip((pki.ca, pki.cert, pki.key), (own.ca, own.cert, own.key), strict=True):
            shutil.copyfile(src, dst)
        config = bus_auth.write_server_config(NATS_CONFIG, node.root / "nats.conf", identities.seeds,
                                              identities.permissions)
        routes = [nats_tls.route_url(other.address, ROUTE_PORT, route_auth) for other in nodes if other is not node]
        with config.open("a") as out:
            out.write("\n" + nats_tls.node_config(node.netns, tls=own, cluster="cy-hosts",
                                                   route_listen=f"0.0.0.0:{ROUTE_PORT}", routes=routes,
                                                   route_auth=route_auth))
        node.start([nats_server_binary(), "-c", str(config), "-js", "-a", "0.0.0.0", "-p", str(CLIENT_PORT),
                    "-sd", str(node.root / "jetstream")], "nats.log", _clean_env(node), REPO)
    return nodes, pki


def _cy(*args: str, operator: str) -> subprocess.CompletedProcess:
    """An operator command, run from the root namespace as the operator."""
    return subprocess.run([sys.executable, "-m", "services.cli", *args, "--nats-nkey", operator], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def _start_services(hosts: Hosts, identities: nats_auth.BusIdentities, nats_url: str,
                    pki: TlsFiles) -> dict[str, Host]:
    parts = {name: hosts.add(name) for name in ("edge", "sched1", "sched2", "engine-real", "engine-sim")}
    users = {"edge": bus_permissions.EDGE, "sched1": bus_permissions.SCHEDULER, "sched2": bus_permissions.SCHEDULER,
             "engine-real": f"{bus_permissions.ENGINE}.{REAL_WORKER}",
             "engine-sim": f"{bus_permissions.ENGINE}.{SIM_WORKER}"}
    metrics = ["--metrics-port", str(METRICS_PORT), "--metrics-host", "0.0.0.0"]
    argv = {
        "edge": ["services.edge", "--host", "0.0.0.0", "--port", str(HTTP_PORT), "--auth", "keys"],
        "sched1": ["services.scheduler", *metrics],
        "sched2": ["services.scheduler", *metrics],
        # No --model-path: the registry and the object store provide the model, into this host's state dir.
        "engine-real": ["services.engine", "--engine", "transformers", "--model-id", DEFAULT_MODEL_ID,
                        "--worker-id", REAL_WORKER, "--slots", "2", *metrics],
        "engine-sim": ["services.engine", "--engine", "simulated", "--model-id", SIM_MODEL,
                       "--worker-id", SIM_WORKER, *metrics],
    }
    for name, host in parts.items():
        bus = ["--nats-url", nats_url, "--nats-nkey", _own_seed(identities, users[name], host),
               *tls_client_flags(host, pki)]
        state = ["--state-dir", str(host.root / "state")] if name.startswith("engine") else []
        host.start([sys.executable, "-m", *argv[name], *bus, *state], "service.log", _clean_env(host), REPO)
    return parts


async def _wait_serving(edge: Host, parts: dict[str, Host], models: set[str], timeout: float) -> None:
    """Until the edge's /healthz lists ``models``; fails with the logs if a part exits first."""
    deadline = time.monotonic() + timeout
    seen: object = None
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            for name, host in parts.items():
                if any(proc.poll() is not None for proc in host.procs):
                    pytest.fail(f"{name} exited:\n{host.log('service.log')[-3000:]}")
            try:
                async with http.get(f"http://{edge.address}:{HTTP_PORT}/healthz") as resp:
                    seen = await resp.json()
                    if resp.status == 200 and models <= set(seen["models"]):
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                seen = exc
            await asyncio.sleep(0.5)
    logs = "\n".join(f"--- {n}\n{h.log('service.log')[-1500:]}" for n, h in parts.items())
    pytest.fail(f"the edge did not list {models} within {timeout}s (last: {seen}):\n{logs}")


def _ask(base_url: str, key: str, model: str, stream: bool) -> tuple[str, str]:
    """One chat completion through the OpenAI SDK: (the text, the model that answered)."""
    client = OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "Name a colour."}]
    if not stream:
        answer = client.chat.completions.create(model=model, messages=messages, max_tokens=8,
                                                extra_body={"cache": False})
        assert answer.usage.completion_tokens > 0
        return answer.choices[0].message.content, answer.model
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=8, stream=True,
                                                 extra_body={"cache": False}))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[0].model


@pytest.mark.timeout(900)
async def test_each_part_on_its_own_host_serves_the_openai_sdk(hosts: Hosts, tmp_path: Path):
    operator_dir = tmp_path / "operator"
    identities = nats_auth.prepare("nkeys", operator_dir, [REAL_WORKER, SIM_WORKER])
    operator = str(identities.seeds[bus_permissions.OPERATOR])
    nodes, pki = _start_nats(hosts, identities, tmp_path / "pki")
    nats_url = ",".join(f"tls://{n.address}:{CLIENT_PORT}" for n in nodes)
    ca_flags = tls_client_flags(nodes[0], pki)  # the operator's commands, from the root namespace
    await wait_for_jetstream(NatsOptions(nats_url=nats_url, nats_nkey=operator, nats_tls_ca=ca_flags[1]), timeout=60)

    applied = _cy("infra", "apply", "--replicas", "3", "--nats-url", nats_url, *ca_flags,
                  operator=operator)
    assert applied.returncode == 0, applied.stderr
    assert "published weights/" in applied.stderr  # the default model, for engines on other hosts
    created = _cy("keys", "create", "--name", "hosts", "--scope", "inference", "--nats-url", nats_url,
                  "--state-dir", str(operator_dir), *ca_flags, operator=operator)
    assert created.returncode == 0, created.stderr
    key = created.stdout.split()[0]

    parts = _start_services(hosts, identities, nats_url, pki)
    edge, real = parts["edge"], parts["engine-real"]
    await _wait_serving(edge, parts, {DEFAULT_MODEL_ID, SIM_MODEL}, timeout=600)

    base_url = f"http://{edge.address}:{HTTP_PORT}/v1"
    text, model = await asyncio.to_thread(_ask, base_url, key, DEFAULT_MODEL_ID, False)
    assert text.strip() and model == DEFAULT_MODEL_ID
    streamed, _ = await asyncio.to_thread(_ask, base_url, key, DEFAULT_MODEL_ID, True)
    assert streamed.strip()
    simulated, model = await asyncio.to_thread(_ask, base_url, key, SIM_MODEL, False)
    assert simulated.strip() and model == SIM_MODEL

    # The real engine's weights came over the bus into its own directory, not from any other path.
    assert (real.root / "state" / "models" / "gguf" / DEFAULT_GGUF).is_file()
    assert f"loading from {real.root / 'state' / 'models' / DEFAULT_MODEL_ID}" in real.log("service.log")
    # Metrics and health bind where the flags say: reachable from another host.
    async with aiohttp.ClientSession() as http:
        for name in ("sched1", "sched2", "engine-real", "engine-sim"):
            async with http.get(f"http://{parts[name].address}:{METRICS_PORT}/healthz") as resp:
                assert resp.status == 200, f"{name}: {await resp.text()}"
            async with http.get(f"http://{parts[name].address}:{METRICS_PORT}/metrics") as resp:
                assert resp.status == 200 and "llm_" in await resp.text()
    refused = [line for n in nodes for line in n.log("nats.log").splitlines() if "Violation" in line]
    assert not refused, refused
