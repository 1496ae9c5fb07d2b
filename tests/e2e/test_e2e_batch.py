"""A batch end to end through ``cy up`` (NATS auth on, the real default model), with the official SDK."""

from __future__ import annotations

import asyncio
import io
import json

import openai
import pytest

from services.common.model_store import DEFAULT_MODEL_ID
from tests.support import CyUp, state_dir_with_models

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


async def test_a_batch_runs_on_the_real_model_and_its_files_come_back(tmp_path, default_model_dir):
    rows = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": DEFAULT_MODEL_ID, "messages": [{"role": "user", "content": f"Count to {i + 2}."}],
                      "max_tokens": 4, "temperature": 0, "cache": False}} for i in range(4)]
    rows.append({"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}})
    data = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    with CyUp(state_dir_with_models(tmp_path, default_model_dir)) as up:
        async with openai.AsyncOpenAI(base_url=f"{up.url}/v1", api_key="unused", max_retries=0, timeout=60) as sdk:
            uploaded = await sdk.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
            batch = await sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                             completion_window="24h")
            async with asyncio.timeout(240):
                while (batch := await sdk.batches.retrieve(batch.id)).status not in (
                        "completed", "failed", "expired", "cancelled"):
                    await asyncio.sleep(0.5)
            assert batch.status == "completed", batch
            assert (batch.request_counts.completed, batch.request_counts.failed) == (4, 1)
            output = [json.loads(line) for line in (await sdk.files.content(batch.output_file_id)).content.splitlines()]
            errors = [json.loads(line) for line in (await sdk.files.content(batch.error_file_id)).content.splitlines()]
        assert sorted(r["custom_id"] for r in output) == [f"q{i}" for i in range(4)]
        for row in output:
            body = row["response"]["body"]
            assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
            assert 0 < body["usage"]["completion_tokens"] <= 4
        assert [(r["custom_id"], r["response"]["status_code"]) for r in errors] == [("bad", 404)]
        assert up.bus_refusals() == []  # the edge's NATS user may do everything a batch needs
