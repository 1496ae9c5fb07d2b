"""Routed requests per second through edge, schedulers and engines: one NATS node vs a 3-node cluster, 1..N schedulers.

    .venv/bin/python bench/cluster_throughput.py [--seconds 10] [--concurrency 16] [--nodes 1,3] [--schedulers 1,2,3]
        [--engines 2]

For each topology (one node with everything R1; three routed loopback nodes with everything R3,
as ``./cy up --nats-cluster 3`` runs them) it starts the services as processes, as ``./cy up``
does, with simulated engines (no model; tokens as fast as they can go), then runs
``--concurrency`` HTTP clients sending non-streaming chat completions (8 tokens, ``cache: false``)
for ``--seconds``. It prints requests/s and latency percentiles per topology and scheduler count
(every combination of ``--nodes`` and ``--schedulers``), as JSON lines. R3 costs a replicated write
(two of three nodes) per queued request and per acknowledgement; more scheduler replicas share the
same durable consumers (what they add is fetch and dispatch capacity, and what they cost is
competing fetches).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import nats  # noqa: E402

from infra import provision  # noqa: E402
from services.cli.infra import wait_for_jetstream  # noqa: E402
from services.cli.readiness import wait_until_ready  # noqa: E402
from services.cli.supervisor import ChildSpec, Supervisor  # noqa: E402
from services.cli.up import NATS_CONFIG  # noqa: E402
from services.common.natsserver import NatsCluster, NatsServer, free_ports  # noqa: E402

MODEL = "sim"


async def _bus(tmp: Path, nodes: int) -> tuple[NatsServer | NatsCluster, str]:
    """Started and provisioned NATS: one node at R1 or ``nodes`` routed nodes at R3; its server list."""
    if nodes == 1:
        server = NatsServer(tmp / "nats", config=NATS_CONFIG, log_file=tmp / "nats.log").start()
    else:
        server = NatsCluster(tmp / "cluster", size=nodes, config=NATS_CONFIG, log_dir=tmp).start()
    url = server.url
    await wait_for_jetstream(url, timeout=60)
    nc = await nats.connect(url.split(","))
    await provision.apply(nc.jetstream(), replicas=1 if nodes == 1 else 3)
    await nc.close()
    return server, url


async def _services(sup: Supervisor, url: str, args: argparse.Namespace, schedulers: int, port: int) -> None:
    py = sys.executable
    for i in range(args.engines):
        await sup.start(ChildSpec(f"engine-{i}", (py, "-m", "services.engine", "--nats-url", url, "--engine",
                                                  "simulated", "--model-id", MODEL, "--worker-id", f"bench-{i}",
                                                  "--slots", "64")))
    for i in range(schedulers):
        await sup.start(ChildSpec(f"scheduler-{i}", (py, "-m", "services.scheduler", "--nats-url", url)))
    await sup.start(ChildSpec("edge", (py, "-m", "services.edge", "--nats-url", url, "--port", str(port))))
    await wait_until_ready(f"http://127.0.0.1:{port}", [MODEL], timeout=120)


async def _drive(base: str, seconds: float, concurrency: int) -> dict[str, float]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "count"}], "max_tokens": 8, "cache": False}
    latencies: list[float] = []
    failures = 0
    deadline = time.monotonic() + seconds

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal failures
        while time.monotonic() < deadline:
            start = time.monotonic()
            async with http.post(f"{base}/v1/chat/completions", json=body) as resp:
                await resp.read()
                if resp.status != 200:
                    failures += 1
                    continue
            latencies.append(time.monotonic() - start)

    async with aiohttp.ClientSession() as http:
        started = time.monotonic()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {"requests_per_s": round(len(latencies) / elapsed, 1), "ok": len(latencies), "failed": failures,
            "p50_ms": round(q[49] * 1000, 1), "p99_ms": round(q[98] * 1000, 1)}


async def _one(nodes: int, schedulers: int, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="cy-bench-") as tmp_name:
        tmp = Path(tmp_name)
        server, url = await _bus(tmp, nodes)
        sup = Supervisor(tmp / "logs", cwd=REPO, console=None, report=lambda _m: None, stop_timeout=10)
        try:
            port = free_ports(1)[0]
            await _services(sup, url, args, schedulers, port)
            await _drive(f"http://127.0.0.1:{port}", 1.0, args.concurrency)  # warm-up
            return {"nodes": nodes, "replicas": 1 if nodes == 1 else 3, "schedulers": schedulers,
                    **await _drive(f"http://127.0.0.1:{port}", args.seconds, args.concurrency)}
        finally:
            await sup.stop_all(("edge", *(f"scheduler-{i}" for i in range(schedulers)),
                                *(f"engine-{i}" for i in range(args.engines))))
            server.stop()


async def main() -> None:
    """Measure every topology and scheduler count, print one JSON line each."""
    def counts(text: str) -> list[int]:
        return [int(n) for n in text.split(",") if n.strip()]

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--nodes", type=counts, default=[1, 3], help="NATS node counts to measure (1: R1, 3: R3)")
    p.add_argument("--schedulers", type=counts, default=[1, 2, 3], help="scheduler replica counts to measure")
    p.add_argument("--engines", type=int, default=2)
    args = p.parse_args()
    for nodes in args.nodes:
        for schedulers in args.schedulers:
            print(json.dumps(await _one(nodes, schedulers, args)), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
