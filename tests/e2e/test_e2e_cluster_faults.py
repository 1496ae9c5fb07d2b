"""NATS node loss under steady streaming load: real processes, a 3-node cluster, SIGKILL.

Two schedulers, two simulated engines and an edge run against a loopback cluster with every
stream and bucket at R3. The node leading ``LLM_INFER`` is killed, then restarted (it rejoins);
then the node the edge is connected to. Clients must not notice beyond a stall: no failed
request, no answer with a missing or repeated token, and no request generated to the end twice
(the engines' finished-request counters add up to the requests sent).
"""

from __future__ import annotations

import json
import re
import sys
import time

import aiohttp
import nats
import pytest

from schemas import names
from services.cli.readiness import wait_until_ready
from services.cli.supervisor import ChildSpec, Supervisor
from services.common.natsserver import NatsCluster
from tests.cluster_support import bare_nats_cluster, current_peers, nats_cluster, stream_leader  # noqa: F401
from tests.load_support import Load, summary
from tests.support import REPO, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "sim"
ENGINES = ("engine-a", "engine-b")


class Platform:
    """Schedulers, engines and an edge as processes on ``cluster``; the edge knows one node to start with."""

    def __init__(self, tmp, cluster: NatsCluster, edge_node: int) -> None:
        self.cluster = cluster
        self.sup = Supervisor(tmp / "logs", cwd=REPO, console=None, report=lambda _m: None, stop_timeout=15)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.edge_node = edge_node
        self.metrics = {worker: free_port() for worker in ENGINES}

    async def start(self) -> None:
        py, servers = sys.executable, self.cluster.url
        for worker in ENGINES:
            await self.sup.start(ChildSpec(worker, (
                py, "-m", "services.engine", "--nats-url", servers, "--engine", "simulated", "--model-id", MODEL,
                "--worker-id", worker, "--slots", "32", "--sim-token-rate", "40",
                "--metrics-port", str(self.metrics[worker]))))
        for name in ("scheduler-1", "scheduler-2"):
            await self.sup.start(ChildSpec(name, (py, "-m", "services.scheduler", "--nats-url", servers)))
        # Seeded with one node only: it learns the others from the cluster, and must move to one of them.
        await self.sup.start(ChildSpec("edge", (py, "-m", "services.edge", "--nats-url",
                                                self.cluster.urls[self.edge_node], "--port", str(self.port))))
        await wait_until_ready(self.url, [MODEL], timeout=120)

    async def finished_generations(self) -> int:
        """Requests the engines generated to their end (all outcomes but cancelled), from their metrics."""
        total = 0
        async with aiohttp.ClientSession() as http:
            for port in self.metrics.values():
                async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    text = await resp.text()
                for outcome, value in re.findall(r'^llm_engine_requests_total\{[^}]*outcome="(\w+)"[^}]*\} (\S+)$',
                                                 text, re.M):
                    if outcome != "cancelled":
                        total += int(float(value))
        return total

    async def stop(self) -> None:
        await self.sup.stop_all(("edge", "scheduler-1", "scheduler-2", *ENGINES))


async def _kill_and_measure(load: Load, node, what: str) -> dict:
    """SIGKILL ``node`` under load; the figures of the requests that overlapped the loss."""
    in_flight = load.in_flight
    killed_at = time.monotonic()
    node.kill()
    await load.until_completed_after(killed_at, count=40)
    figures = summary(load.after(killed_at), load.expected)
    return {"fault": what, "in_flight_at_kill": in_flight, **figures}


async def test_losing_the_queue_leader_and_the_edges_node_goes_unnoticed(tmp_path, nats_cluster):
    cluster = nats_cluster
    nc = await nats.connect(cluster.urls, name="pytest-observer")
    js = nc.jetstream()
    leader = await stream_leader(js, names.INFER_STREAM)
    edge_node = next(i for i, name in enumerate(cluster.server_names) if name != leader)
    platform = Platform(tmp_path, cluster, edge_node)
    load = Load(platform.url, MODEL, max_tokens=16, concurrency=4)
    report = []
    try:
        await platform.start()
        load.start()
        await load.until_completed_after(time.monotonic(), count=20)  # steady state before any fault

        # 1. The node leading the inference queue.
        leader_node = cluster.node_named(leader)
        report.append(await _kill_and_measure(load, leader_node, f"LLM_INFER leader ({leader})"))
        assert await stream_leader(js, names.INFER_STREAM) != leader
        leader_node.start()
        assert len(await current_peers(js, names.INFER_STREAM)) == 3  # it rejoined and caught up

        # 2. The node the edge is connected to.
        report.append(await _kill_and_measure(load, cluster.nodes[edge_node],
                                              f"edge's node ({cluster.server_names[edge_node]})"))
        cluster.nodes[edge_node].start()
        assert len(await current_peers(js, names.INFER_STREAM)) == 3
        await load.stop()

        total = summary(load.outcomes, load.expected)
        total["duplicated_generations"] = await platform.finished_generations() - total["requests"]
        print("\ncluster faults:", json.dumps(report, indent=1), "\nwhole run:", json.dumps(total))
        for phase in report:
            assert phase["failed"] == 0 and phase["wrong_text"] == 0, (phase, [
                o for o in load.outcomes if not o.ok][:5])
        assert total["duplicated_generations"] == 0, "a request was generated to its end twice"
    finally:
        if not load._stop.is_set():
            await load.stop()
        await platform.stop()
        await nc.close()
