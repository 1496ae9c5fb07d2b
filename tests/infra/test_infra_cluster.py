"""Provisioning on a real 3-node cluster: replicas are kept, raised in place, and never refused by cy up."""

from __future__ import annotations

import subprocess
import sys

import nats
import pytest

from infra import provision
from schemas import names
from tests.cluster_support import bare_nats_cluster, current_peers, nats_cluster  # noqa: F401 (fixtures)
from tests.support import REPO, wait_for

DEFS = provision.load_definitions()
EVERY_STREAM = ([*DEFS["streams"]] + [f"KV_{b}" for b in DEFS["kv"]] + [f"OBJ_{b}" for b in DEFS["object_stores"]])


async def _replicas(js) -> dict[str, int]:
    return {name: (await js.stream_info(name)).config.num_replicas for name in EVERY_STREAM}


async def _consumer_peers(js, stream: str, durable: str, want: int) -> bool:
    info = await js.consumer_info(stream, durable)
    return info.cluster is not None and len(info.cluster.replicas or []) == want - 1


async def test_applying_without_a_replica_count_keeps_r3(nats_cluster):
    nc = await nats.connect(nats_cluster.urls)
    try:
        actions = await provision.apply(nc.jetstream(), replicas=None)
        assert {a.action for a in actions} == {"unchanged"}
        assert set((await _replicas(nc.jetstream())).values()) == {3}
    finally:
        await nc.close()


async def test_a_different_replica_count_is_refused_without_update(nats_cluster):
    nc = await nats.connect(nats_cluster.urls)
    try:
        with pytest.raises(provision.ProvisionError, match="num_replicas: server has 3, definition wants 1"):
            await provision.apply(nc.jetstream(), replicas=1)
    finally:
        await nc.close()


async def test_update_raises_replicas_in_place_keeping_the_data(bare_nats_cluster):
    nc = await nats.connect(bare_nats_cluster.urls)
    try:
        js = nc.jetstream()
        await provision.apply(js, replicas=None)
        assert set((await _replicas(js)).values()) == {1}
        for i in range(5):
            await js.publish(names.train_job_events(f"job{i}"), b"{}")
        kv = await js.key_value(names.MODELS_BUCKET)
        await kv.put("kept", b"yes")
        store = await js.object_store(names.ARTIFACTS_STORE)
        await store.put("kept.bin", b"x" * 100_000)

        actions = await provision.apply(js, replicas=3, update=True)

        assert {a.name for a in actions if a.action == "updated"} == {*EVERY_STREAM, *DEFS["consumers"]}
        assert set((await _replicas(js)).values()) == {3}
        for stream in EVERY_STREAM:
            assert len(await current_peers(js, stream)) == 3  # the data was copied to the new peers
        for durable, d in DEFS["consumers"].items():
            assert await wait_for(lambda: _consumer_peers(js, d["stream"], durable, 3), timeout=30), durable
        assert (await js.stream_info(names.TRAIN_EVENTS_STREAM)).state.messages == 5
        assert (await kv.get("kept")).value == b"yes"
        assert (await store.get("kept.bin")).data == b"x" * 100_000
        assert {a.action for a in await provision.apply(js, replicas=None)} == {"unchanged"}
    finally:
        await nc.close()


def test_cy_infra_apply_and_its_exit_status_on_a_cluster(nats_cluster):
    def cy(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "services.cli", "infra", "apply", "--nats-url",
                               nats_cluster.url, *args], cwd=REPO, capture_output=True, text=True, timeout=60)

    kept = cy()
    assert kept.returncode == 0, kept.stderr
    assert "unchanged" in kept.stdout and "differs" not in kept.stderr
    lower = cy("--replicas", "1")
    assert lower.returncode == 2 and "num_replicas: server has 3, definition wants 1" in lower.stderr
