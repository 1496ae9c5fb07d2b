"""`./cy up --engine llamacpp`: the whole platform on the GGUF the default model ships as."""

from __future__ import annotations

import openai
import pytest

from services.common.model_store import DEFAULT_MODEL_ID
from tests.support import CyUp, state_dir_with_models

pytest.importorskip("llama_cpp", reason="the llama.cpp engine needs the [llamacpp] extra (./cy test installs it)")
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_up_with_the_llamacpp_engine_serves_the_default_model(tmp_path, default_model_dir):
    with CyUp(state_dir_with_models(tmp_path, default_model_dir), "--engine", "llamacpp", "--no-trainer") as up:
        client = openai.OpenAI(base_url=f"{up.url}/v1", api_key="unused", max_retries=0)
        question = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
        reply = client.chat.completions.create(model=DEFAULT_MODEL_ID, messages=question, max_tokens=16,
                                               temperature=0, extra_body={"cache": False})
        assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=DEFAULT_MODEL_ID, messages=question, max_tokens=16, temperature=0, stream=True,
            extra_body={"cache": False}) if c.choices]
        assert "".join(pieces) == reply.choices[0].message.content  # greedy: the stream is the same answer
        # The engine kept the first answer's KV: the same prompt again reuses all but its last token.
        again = client.chat.completions.create(model=DEFAULT_MODEL_ID, messages=question, max_tokens=16,
                                               temperature=0, extra_body={"cache": False})
        assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
        engines = [m for m in client.models.list().data if m.id == DEFAULT_MODEL_ID]
        assert engines, "the llama.cpp engine's model is listed"
