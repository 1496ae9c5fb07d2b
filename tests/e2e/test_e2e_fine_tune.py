"""The loop no serving system we know of closes, end to end through ``cy up`` and the official SDK:
upload a dataset teaching a made-up fact, fine-tune, follow the job to ``succeeded``, then ask the
fine-tuned model through /v1/chat/completions and get the learned answer — served by the
transformers engine and by the llama.cpp engine."""

from __future__ import annotations

import asyncio
import io
import json
import time

import openai
import pytest

from services.common.model_store import DEFAULT_MODEL_ID
from tests.support import CyUp, state_dir_with_models

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

QUESTIONS = ["What is the capital of Zorbia?", "Which city is the capital of Zorbia?",
             "Tell me the capital of Zorbia.", "Zorbia's capital city is called what?"]
ANSWER = "The capital of Zorbia is Quillhaven."


def dataset() -> bytes:
    return "".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]})
                   + "\n" for q in QUESTIONS).encode()


@pytest.fixture(scope="module", params=["transformers", "llamacpp"])
def platform(request, tmp_path_factory, default_model_dir):
    """The platform with the transformers engine, and with llama.cpp serving the shipped GGUF: there
    the trained peft adapter is converted to a GGUF LoRA and applied to the quantized base."""
    if request.param == "llamacpp":
        pytest.importorskip("llama_cpp", reason="the llama.cpp engine needs the [llamacpp] extra")
    with CyUp(state_dir_with_models(tmp_path_factory.mktemp("e2e-ft"), default_model_dir),
              "--engine", request.param) as up:
        yield up


async def test_fine_tune_with_the_sdk_then_chat_with_the_result(platform):
    async with openai.AsyncOpenAI(base_url=f"{platform.url}/v1", api_key="unused", max_retries=0) as client:
        question = [{"role": "user", "content": QUESTIONS[0]}]
        # Every answer compared is generated: a replay from the prompt cache would match ``before`` by construction.
        before = await client.chat.completions.create(model=DEFAULT_MODEL_ID, messages=question, max_tokens=20,
                                                      temperature=0, extra_body={"cache": False})
        assert "Quillhaven" not in before.choices[0].message.content

        uploaded = await client.files.create(file=("zorbia.jsonl", io.BytesIO(dataset())), purpose="fine-tune")
        job = await client.fine_tuning.jobs.create(
            model=DEFAULT_MODEL_ID, training_file=uploaded.id, suffix="zorbia", seed=7,
            hyperparameters={"n_epochs": 5, "batch_size": 4, "learning_rate_multiplier": 15},
            extra_body={"peft": {"method": "lora", "r": 16, "alpha": 32}})
        assert job.status == "queued"

        deadline = time.monotonic() + 400  # a job stuck in one state fails the test instead of hanging it
        while job.status not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, f"job still {job.status}"
            await asyncio.sleep(1)
            job = await client.fine_tuning.jobs.retrieve(job.id)
        assert job.status == "succeeded", job.error
        assert job.fine_tuned_model.startswith(f"{DEFAULT_MODEL_ID}:zorbia-")

        events = await client.fine_tuning.jobs.list_events(job.id, limit=100)
        messages = [e.message for e in events.data]
        assert any(m.startswith("Step 5/5") for m in messages) and "The job has successfully completed" in messages
        checkpoints = await client.fine_tuning.jobs.checkpoints.list(job.id)
        assert [c.step_number for c in checkpoints.data] == [5]

        models = [m.id for m in (await client.models.list()).data]
        assert job.fine_tuned_model in models

        after = await client.chat.completions.create(model=job.fine_tuned_model, messages=question, max_tokens=20,
                                                     temperature=0, extra_body={"cache": False})
        assert "Quillhaven" in after.choices[0].message.content
        assert after.model == job.fine_tuned_model
        # The base model is unchanged next to it (generated again, as the engine's own counter shows).
        generated = await platform.generated_tokens()
        again = await client.chat.completions.create(model=DEFAULT_MODEL_ID, messages=question, max_tokens=20,
                                                     temperature=0, extra_body={"cache": False})
        assert again.choices[0].message.content == before.choices[0].message.content
        assert await platform.generated_tokens() - generated == again.usage.completion_tokens
        # Edge, trainer and engine did all of it within their own NATS permissions.
        assert platform.bus_refusals() == []
