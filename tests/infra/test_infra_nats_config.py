"""infra/nats configs: valid for nats-server, and the 3-node cluster really serves R3 streams.

The cluster configs name fixed loopback ports; the test runs copies of them on free ports
(same files otherwise) so it never collides with anything else on the machine.
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import time
from pathlib import Path

import nats
import pytest
from nats.js.errors import APIError, ServiceUnavailableError

from infra import provision
from schemas import names
from services.common.natsserver import NatsServer, free_ports, nats_server_binary

NATS_DIR = Path(provision.__file__).parent / "nats"
CONFIGS = [NATS_DIR / "server.conf", *sorted((NATS_DIR / "cluster").glob("n*.conf"))]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_is_valid_for_nats_server(config: Path):
    result = subprocess.run([nats_server_binary(), "-t", "-c", str(config)], capture_output=True, text=True)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid" in result.stdout + result.stderr


def test_there_are_three_cluster_nodes():
    assert [p.name for p in CONFIGS[1:]] == ["n1.conf", "n2.conf", "n3.conf"]


async def test_single_node_config_runs_as_cy_up_starts_it(tmp_path: Path):
    server = NatsServer(tmp_path / "nats", config=NATS_DIR / "server.conf", log_file=tmp_path / "nats.log").start()
    try:
        nc = await nats.connect(server.url)
        assert nc.max_payload == 8 * 1024 * 1024
        await provision.apply(nc.jetstream())
        await nc.close()
    finally:
        server.stop()
    assert (tmp_path / "nats" / "jetstream").is_dir()  # -sd overrode the config's store_dir


@pytest.fixture
def cluster(tmp_path: Path):
    """The three cluster nodes from infra/nats/cluster, each fixed port mapped to a free one."""
    texts = {p.stem: p.read_text() for p in CONFIGS[1:]}
    fixed = sorted({int(m) for t in texts.values() for m in re.findall(r"127\.0\.0\.1:(\d+)", t)})
    remap = dict(zip(fixed, free_ports(len(fixed)), strict=True))
    procs, urls = [], []
    for node, text in texts.items():
        text = re.sub(r"127\.0\.0\.1:(\d+)", lambda m: f"127.0.0.1:{remap[int(m.group(1))]}", text)
        text = re.sub(r'store_dir: ".*"', f'store_dir: "{tmp_path / node}"', text)
        conf = tmp_path / f"{node}.conf"
        conf.write_text(text)
        client_port = re.search(r"^listen: 127\.0\.0\.1:(\d+)", text, re.M).group(1)
        urls.append(f"nats://127.0.0.1:{client_port}")
        with (tmp_path / f"{node}.log").open("wb") as log:
            procs.append(subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=log,
                                          stderr=subprocess.STDOUT))
    try:
        yield urls, procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)


async def _apply_when_cluster_is_up(url: str, timeout: float = 30.0) -> list[provision.Action]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            nc = await nats.connect(url, connect_timeout=1, allow_reconnect=False, max_reconnect_attempts=1)
        except (nats.errors.NoServersError, OSError):
            nc = None
        if nc is not None:
            try:
                return await provision.apply(nc.jetstream(), replicas=3)
            except (ServiceUnavailableError, nats.errors.TimeoutError, nats.errors.NoRespondersError, APIError):
                pass  # no JetStream meta leader elected yet (10008)
            finally:
                await nc.close()
        assert time.monotonic() < deadline, "the 3-node cluster did not offer JetStream in time"
        await asyncio.sleep(0.5)


@pytest.mark.slow
async def test_cluster_serves_r3_streams_after_losing_a_node(cluster):
    urls, procs = cluster

    actions = await _apply_when_cluster_is_up(urls[0])

    # A try cut short by a meta-leader election may have created some streams already; the next one
    # finds those as they should be ("unchanged"), never needing an update.
    assert {a.action for a in actions} <= {"created", "unchanged"}  # and below: the stream is there, R3
    nc = await nats.connect(urls[1:], connect_timeout=2)
    try:
        js = nc.jetstream()
        info = await js.stream_info(names.INFER_STREAM)
        assert info.config.num_replicas == 3
        assert len(info.cluster.replicas) == 2

        procs[0].terminate()
        procs[0].wait(10)
        deadline = time.monotonic() + 30
        while True:  # the stream may need a new leader before it acknowledges again
            try:
                ack = await js.publish(names.infer_submit("normal"), b"{}", timeout=2)
                break
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError, APIError):
                assert time.monotonic() < deadline, "R3 stream stopped serving after one node died"
                await asyncio.sleep(0.5)
        assert ack.stream == names.INFER_STREAM
    finally:
        await nc.close()


def test_picked_ports_are_free_distinct_and_outside_the_range_clients_connect_from():
    """A port handed to a server that binds it later must not be one any outgoing connection can
    take meanwhile (a whole suite's start-ups once did): below the kernel's ephemeral range."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = free_ports(20, span=3)

    assert len({p + i for p in ports for i in range(3)}) == 60  # distinct, spans included
    assert all(p + 2 < low for p in ports)
    assert not set(ports) & set(free_ports(20))  # never handed out twice
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port + 2))
