"""``POST /tokenize`` and ``POST /detokenize`` through the edge to a real engine's control subject."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient, TestServer
from transformers import AutoTokenizer

from services.common.model_store import DEFAULT_MODEL_ID, default_model_gguf
from services.edge import create_app
from tests.edge_harness import assert_error, edge_config, wait_until_served  # noqa: F401 - fixtures
from tests.engine.test_engine_service import running_engine
from tests.engine_models_harness import real_engine, register
from tests.scheduler.test_scheduler_harness import start_scheduler  # noqa: F401 - fixture

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]
PROMPT = "The quick brown fox jumps over the lazy dog."


async def post(client, path: str, body: dict) -> tuple[int, dict]:
    resp = await client.post(path, json=body)
    return resp.status, await resp.json()


async def test_tokenize_round_trips_with_the_transformers_engine(nc, js, nats_server, edge_config, default_model_dir,
                                                                 tmp_path, start_scheduler):
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    chat_ids = list(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)["input_ids"])
    bare_ids = list(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=False, tokenize=True)["input_ids"])
    await register(js, "smol-elsewhere", default_model_dir)  # registered, loaded on no engine
    async with real_engine(nats_server.url, default_model_dir, tmp_path), start_scheduler(), \
            TestClient(TestServer(create_app(edge_config))) as client:
        await wait_until_served(client, DEFAULT_MODEL_ID, timeout=30)

        status, body = await post(client, "/tokenize", {"model": DEFAULT_MODEL_ID, "prompt": PROMPT})
        assert status == 200, body
        assert body == {"tokens": tokenizer.encode(PROMPT), "count": len(tokenizer.encode(PROMPT)),
                        "max_model_len": 8192}
        status, text = await post(client, "/detokenize", {"model": DEFAULT_MODEL_ID, "tokens": body["tokens"]})
        assert status == 200 and text == {"prompt": PROMPT}

        # An alias and a ``<base>:<adapter>`` name tokenize with the base model's tokenizer.
        status, chat = await post(client, "/tokenize", {"model": "default", "messages": MESSAGES})
        assert status == 200 and chat["tokens"] == chat_ids and chat["count"] == len(chat_ids), chat
        status, bare = await post(client, "/tokenize", {"model": f"{DEFAULT_MODEL_ID}:some-adapter",
                                                        "messages": MESSAGES, "add_generation_prompt": False})
        assert status == 200 and bare["tokens"] == bare_ids and bare["count"] < chat["count"], bare
        status, text = await post(client, "/detokenize", {"model": "default", "tokens": chat_ids})
        assert status == 200 and text["prompt"] == tokenizer.decode(chat_ids)
        assert "Name three colours." in text["prompt"] and text["prompt"].startswith("<|im_start|>system")

        # ``count`` is what generation bills as the prompt.
        resp = await client.post("/v1/chat/completions", json={"model": DEFAULT_MODEL_ID, "messages": MESSAGES,
                                                                "max_tokens": 2, "cache": False})
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["usage"]["prompt_tokens"] == chat["count"]

        cases = [
            ({"model": "no-such-model", "prompt": "x"}, "/tokenize", 404, "model_not_found", "model"),
            ({"model": "smol-elsewhere", "prompt": "x"}, "/tokenize", 503, "unavailable", None),
            ({"model": DEFAULT_MODEL_ID}, "/tokenize", 400, "invalid_request", "prompt"),
            ({"model": DEFAULT_MODEL_ID, "prompt": "x", "messages": MESSAGES}, "/tokenize", 400, "invalid_request",
             "prompt"),
            ({"model": DEFAULT_MODEL_ID, "prompt": 5}, "/tokenize", 400, "invalid_request", "prompt"),
            ({"model": DEFAULT_MODEL_ID, "prompt": "x", "return_token_strs": True}, "/tokenize", 400, "unsupported",
             "return_token_strs"),
            ({"model": DEFAULT_MODEL_ID, "messages": [{"role": "wizard", "content": "x"}]}, "/tokenize", 400,
             "invalid_request", "messages[0].role"),
            ({"model": DEFAULT_MODEL_ID}, "/detokenize", 400, "invalid_request", "tokens"),
            ({"model": DEFAULT_MODEL_ID, "tokens": [1, 10**9]}, "/detokenize", 400, "invalid_request", "tokens"),
            ({"model": "no-such-model", "tokens": [1]}, "/detokenize", 404, "model_not_found", "model"),
        ]
        for body, path, want_status, code, param in cases:
            status, answer = await post(client, path, body)
            assert status == want_status, (path, body, answer)
            assert_error(answer, code, param)


@pytest.mark.slow
async def test_tokenize_round_trips_with_the_llamacpp_engine(nc, js, nats_server, edge_config, default_model_dir,
                                                             tmp_path):
    pytest.importorskip("llama_cpp", reason="the llama.cpp engine needs the [llamacpp] extra")
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    chat_ids = list(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)["input_ids"])
    async with real_engine(nats_server.url, default_model_gguf(), tmp_path, "--engine", "llamacpp"), \
            TestClient(TestServer(create_app(edge_config))) as client:
        await wait_until_served(client, DEFAULT_MODEL_ID, timeout=60)
        status, body = await post(client, "/tokenize", {"model": DEFAULT_MODEL_ID, "messages": MESSAGES})
        assert status == 200, body
        assert body["tokens"] == chat_ids and body["count"] == len(chat_ids) and body["max_model_len"] > 0
        status, prompt = await post(client, "/tokenize", {"model": DEFAULT_MODEL_ID, "prompt": PROMPT})
        assert status == 200 and prompt["tokens"] == tokenizer.encode(PROMPT), prompt
        status, text = await post(client, "/detokenize", {"model": DEFAULT_MODEL_ID, "tokens": prompt["tokens"]})
        assert status == 200 and text == {"prompt": PROMPT}


async def test_an_engine_without_a_tokenizer_answers_unsupported(nc, nats_server, edge_config):
    async with running_engine(nats_server.url), TestClient(TestServer(create_app(edge_config))) as client:
        await wait_until_served(client, "sim", timeout=30)
        for path, body in (("/tokenize", {"model": "sim-alias", "prompt": "x"}),
                           ("/detokenize", {"model": "sim", "tokens": [1]})):
            status, answer = await post(client, path, body)
            assert status == 400, answer
            assert_error(answer, "unsupported", "model")
            assert "simulated" in answer["error"]["message"]
