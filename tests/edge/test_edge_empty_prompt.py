"""An empty prompt to the real model is the caller's 400, not the engine's 502 (found by bench/api_fuzz.py).

SmolLM2's tokenizer adds no BOS token, so ``""`` renders as no tokens at all; the model cannot start
from nothing, and before the engine checked for it torch failed and the client got ``engine_failed``.
"""

from __future__ import annotations

from aiohttp.test_utils import TestClient, TestServer

from services.common.model_store import DEFAULT_MODEL_ID
from services.edge import create_app
from tests.edge_harness import assert_error, edge_config, wait_until_served  # noqa: F401 - fixtures
from tests.engine_models_harness import real_engine
from tests.scheduler.test_scheduler_harness import start_scheduler  # noqa: F401 - fixture


async def test_an_empty_prompt_is_a_400_and_the_engine_keeps_serving(nc, nats_server, edge_config,
                                                                      default_model_dir, tmp_path, start_scheduler):
    async with real_engine(nats_server.url, default_model_dir, tmp_path), start_scheduler(), \
            TestClient(TestServer(create_app(edge_config))) as client:
        await wait_until_served(client, DEFAULT_MODEL_ID, timeout=30)
        for path, body in (("/v1/completions", {"model": DEFAULT_MODEL_ID, "prompt": "", "cache": False}),
                           ("/v1/completions", {"model": DEFAULT_MODEL_ID, "prompt": [""], "cache": False}),
                           ("/api/v1/inference", {"modelId": DEFAULT_MODEL_ID, "prompt": "", "cache": False})):
            resp = await client.post(path, json=body)
            answer = await resp.json()
            assert resp.status == 400, (path, body, answer)
            assert_error(answer, "invalid_request")
            assert "empty" in answer["error"]["message"], answer

        # The same engine still answers the next request: the refusal hurt nothing.
        resp = await client.post("/v1/completions", json={"model": DEFAULT_MODEL_ID, "prompt": "Hello",
                                                          "max_tokens": 2, "cache": False})
        answer = await resp.json()
        assert resp.status == 200, answer
        assert answer["usage"]["completion_tokens"] >= 1
