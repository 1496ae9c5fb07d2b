"""``/tokenize`` and ``/detokenize`` on a platform started as a user starts it (``cy up``, authenticated bus)."""

from __future__ import annotations

import aiohttp
import pytest
from transformers import AutoTokenizer

from services.common.model_store import DEFAULT_MODEL_ID
from tests.support import CyUp, state_dir_with_models

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


async def test_tokenize_counts_what_generation_bills_and_the_bus_refuses_nothing(tmp_path, default_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    # The edge tokenizes with the served model's HF tokenizer, which this test compares with: transformers.
    with CyUp(state_dir_with_models(tmp_path, default_model_dir), "--no-trainer", "--engine", "transformers") as up:
        async with aiohttp.ClientSession(up.url) as http:
            async with http.post("/tokenize", json={"model": DEFAULT_MODEL_ID, "messages": QUESTION}) as resp:
                tokenized = await resp.json()
                assert resp.status == 200, tokenized
            async with http.post("/v1/chat/completions", json={
                    "model": DEFAULT_MODEL_ID, "messages": QUESTION, "max_tokens": 4, "cache": False}) as resp:
                chat = await resp.json()
                assert resp.status == 200, chat
            async with http.post("/detokenize", json={"model": DEFAULT_MODEL_ID,
                                                      "tokens": tokenized["tokens"]}) as resp:
                text = await resp.json()
                assert resp.status == 200, text
        expected = list(tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True,
                                                      tokenize=True)["input_ids"])
        assert tokenized["tokens"] == expected and tokenized["count"] == chat["usage"]["prompt_tokens"]
        assert text["prompt"] == tokenizer.decode(expected)
        # The edge's NATS user may request the engine's control subject: no permission violation.
        assert up.bus_refusals() == []
