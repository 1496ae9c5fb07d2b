"""Test support for a JetStream cluster: three real nats-server nodes on loopback, routed together.

``nats_cluster`` is a fixture (import it into a test module): the nodes started on free ports,
JetStream's meta leader elected, every definition applied at R3. Every node is stopped at the end,
whatever the test did to it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats
import pytest
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import APIError, ServiceUnavailableError

from infra import provision
from services.cli.infra import wait_for_jetstream
from services.cli.up import NATS_CONFIG
from services.common.natsserver import NatsCluster

# What a stream or JetStream itself answers while a leader is being elected.
ELECTION_ERRORS = (NoRespondersError, ServiceUnavailableError, NatsTimeoutError, APIError)


@pytest.fixture
async def bare_nats_cluster(tmp_path: Path):
    """Three started, routed nodes with a JetStream meta leader, nothing provisioned."""
    (tmp_path / "logs").mkdir(exist_ok=True)
    cluster = NatsCluster(tmp_path / "cluster", size=3, config=NATS_CONFIG, log_dir=tmp_path / "logs")
    cluster.start()
    try:
        await wait_for_jetstream(cluster.url, timeout=60)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
async def nats_cluster(bare_nats_cluster: NatsCluster):
    """Three started, routed nodes with every stream, consumer and bucket at R3."""
    nc = await nats.connect(bare_nats_cluster.urls, name="pytest-provision")
    try:
        await provision.apply(nc.jetstream(), replicas=3)
    finally:
        await nc.close()
    return bare_nats_cluster


async def stream_leader(js, stream: str, timeout: float = 30.0) -> str:
    """The ``server_name`` of the node leading ``stream``, once it has one."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = await js.stream_info(stream)
            if info.cluster is not None and info.cluster.leader:
                return info.cluster.leader
        except ELECTION_ERRORS:
            pass
        assert time.monotonic() < deadline, f"{stream} had no leader within {timeout}s"
        await asyncio.sleep(0.2)


async def current_peers(js, stream: str, timeout: float = 60.0, want: int = 3) -> list[str]:
    """The names of ``stream``'s leader and current (caught-up) replicas, once ``want`` of them are."""
    deadline = time.monotonic() + timeout
    peers: list[str] = []
    while True:
        try:
            info = await js.stream_info(stream)
            peers = [info.cluster.leader] if info.cluster and info.cluster.leader else []
            peers += [r.name for r in (info.cluster.replicas or []) if r.current and not r.offline]
            if len(peers) >= want:
                return peers
        except ELECTION_ERRORS:
            pass
        assert time.monotonic() < deadline, f"{stream} has {peers} current, not {want}, after {timeout}s"
        await asyncio.sleep(0.2)
