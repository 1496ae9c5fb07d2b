"""``POST /v1/models/load`` and ``DELETE /v1/models/{model}`` against a real engine over the control subjects."""

from __future__ import annotations

from aiohttp.test_utils import TestClient, TestServer

from services.common.model_store import DEFAULT_MODEL_ID
from services.edge import create_app
from tests.edge_harness import assert_error, edge_config, wait_until_served  # noqa: F401 - fixtures
from tests.engine_models_harness import real_engine, register
from tests.scheduler.test_scheduler_harness import start_scheduler  # noqa: F401 - fixture


async def model_ids(client) -> set[str]:
    return {m["id"] for m in (await (await client.get("/v1/models")).json())["data"]}


async def test_load_then_unload_a_registered_model_over_http(nc, js, nats_server, edge_config, default_model_dir,
                                                            tmp_path, start_scheduler):
    await register(js, "smol-http", default_model_dir, aliases=["http-alias"])
    await register(js, "smol-missing", tmp_path / "nothing-here")
    async with real_engine(nats_server.url, default_model_dir, tmp_path) as (service, worker), \
            start_scheduler(), TestClient(TestServer(create_app(edge_config))) as client:
        await wait_until_served(client, DEFAULT_MODEL_ID, timeout=30)

        resp = await client.post("/v1/models/load", json={"model": "http-alias"})
        body = await resp.json()
        assert resp.status == 200, body
        assert body["model"] == "smol-http" and body["worker"] == worker and body["evicted"] == []
        assert set(body["models"]) == {DEFAULT_MODEL_ID, "smol-http"}
        assert "smol-http" in await model_ids(client)  # the reply's heartbeat updated the edge at once
        chat = await client.post("/v1/chat/completions", json={
            "model": "http-alias", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert chat.status == 200 and (await chat.json())["model"] == "smol-http"

        deleted = await client.delete("/v1/models/http-alias")
        body = await deleted.json()
        assert deleted.status == 200 and body == {"id": "smol-http", "object": "model", "deleted": True,
                                                  "workers": [worker], "errors": []}
        assert "smol-http" not in await model_ids(client)
        assert [m.id for m in service.host.served_models()] == [DEFAULT_MODEL_ID]

        again = await client.delete("/v1/models/smol-http")
        assert again.status == 404
        assert_error(await again.json(), "model_not_found", "model")
        unknown = await client.post("/v1/models/load", json={"model": "never-registered"})
        assert unknown.status == 404
        assert_error(await unknown.json(), "model_not_found", "model")
        broken = await client.post("/v1/models/load", json={"model": "smol-missing", "worker": worker})
        assert broken.status == 404
        assert_error(await broken.json(), "model_not_found")
        assert "nothing-here" in (await broken.json())["error"]["message"]
        elsewhere = await client.post("/v1/models/load", json={"model": "smol-http", "worker": "no-such-engine"})
        assert elsewhere.status == 404
        assert_error(await elsewhere.json(), "not_found", "worker")
        bad = await client.post("/v1/models/load", json={"modle": "smol-http"})
        assert bad.status == 400
        assert_error(await bad.json(), "invalid_request")
        assert DEFAULT_MODEL_ID in await model_ids(client)

        # Registered but loaded nowhere: the edge publishes it anyway and the scheduler cold-starts it.
        cold = await client.post("/v1/chat/completions", json={
            "model": "http-alias", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "timeout": 120})  # loading a model on a busy 2-core machine can take longer than the default
        assert cold.status == 200, await cold.text()
        assert (await cold.json())["model"] == "smol-http"
        assert "smol-http" in await model_ids(client)
        never = await client.post("/v1/chat/completions", json={
            "model": "never-registered", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert never.status == 404
