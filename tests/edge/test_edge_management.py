"""Management endpoints: system views, the cluster view from the bus, the cluster-wide strategy switch."""

from __future__ import annotations

import asyncio

from schemas import names
from tests.support import wait_for
from tests.edge_harness import (  # noqa: F401 - fixtures
    MODEL,
    assert_error,
    chat_body,
    client,
    edge_config,
    engine,
)


async def test_system_status_health_and_metrics(client, engine):
    status = await (await client.get("/v1/system/status")).json()
    assert status["nats"] == "connected" and status["engines"] == 1 and status["models"] == [MODEL]
    health = await (await client.get("/v1/system/health")).json()
    assert health["engineDetails"][0]["worker"] == engine.worker
    await client.get("/v1/models")
    metrics = await (await client.get("/v1/system/metrics")).json()
    assert any(s["labels"].get("route") for s in metrics["llm_edge_requests_total"])


async def test_cluster_status_shows_engines_queue_depth_and_strategy(client, engine, js):
    await js.publish(names.infer_submit("low"), b"{}")  # a queued request nobody has taken yet
    body = await (await client.get("/v1/cluster/status")).json()
    assert [e["worker"] for e in body["engines"]] == [engine.worker]
    assert body["queueDepth"]["low"] == 1 and body["queueDepth"]["high"] == 0
    assert "default" in body["strategy"]


async def test_strategy_switch_is_stored_in_kv_for_every_scheduler(client, engine, js):
    resp = await client.post("/v1/cluster/strategy", json={"strategy": "Round_Robin"})
    assert resp.status == 200 and (await resp.json())["strategy"] == "round_robin"
    kv = await js.key_value(names.SCHEDULER_CONFIG_BUCKET)
    assert (await kv.get(names.STRATEGY_KEY)).value == b"round_robin"
    body = await (await client.get("/v1/cluster/status")).json()
    assert body["strategy"] == "round_robin"
    bad = await client.post("/v1/cluster/strategy", json={"strategy": "fastest"})
    assert bad.status == 400
    assert_error(await bad.json(), "invalid_request")
    assert "least_connections" in (await bad.json())["error"]["message"]
    assert (await kv.get(names.STRATEGY_KEY)).value == b"round_robin"


async def test_a_failed_engine_shows_its_reason_in_cluster_status_and_health_detail(client, engine):
    body = await (await client.get("/v1/cluster/status")).json()
    assert body["engines"][0]["health"] == "ok" and body["engines"][0]["healthReason"] == ""
    engine.health, engine.health_reason = "failed", "smol: the transformers model thread is not running"
    await engine.beat()

    async def reported() -> bool:
        status = await (await client.get("/v1/cluster/status")).json()
        return status["engines"][0]["health"] == "failed"

    assert await wait_for(reported, timeout=5)
    status = await (await client.get("/v1/cluster/status")).json()
    assert status["engines"][0]["healthReason"] == engine.health_reason
    detail = await (await client.get("/api/v1/health?detail=true")).json()
    assert [(e["worker"], e["health"], e["healthReason"]) for e in detail["engineDetails"]] == \
        [(engine.worker, "failed", engine.health_reason)]
