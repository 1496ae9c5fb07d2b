"""A migrated request on the transformers backend: given the answer so far (``continuation``), a greedy
generation carries on exactly where the lost engine stopped, token for token."""

from __future__ import annotations

import uuid

import pytest
import pytest_asyncio

from schemas import ChatMessage, InferenceRequest, SamplingParams
from services.engine.backend import Chunk, Finished
from services.engine.backends import backend_class

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

QUESTION = "Write a long story about a brave cat."


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(default_model_dir):
    eng = backend_class("transformers")(model_path=default_model_dir, model_id="m", slots=2)
    await eng.start()
    yield eng
    await eng.close()


def chat(max_tokens: int, continuation: str = "") -> InferenceRequest:
    return InferenceRequest(id=f"c-{uuid.uuid4().hex[:12]}", model="m", reply_to="unused", continuation=continuation,
                            messages=[ChatMessage(role="user", content=QUESTION)],
                            sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0))


async def generate(engine, req: InferenceRequest) -> tuple[list[int], str, Finished]:
    ids, text, fin = [], "", None
    async for ev in engine.generate(req):
        if isinstance(ev, Chunk):
            ids.extend(ev.token_ids)
            text += ev.text
        else:
            fin = ev
    return ids, text, fin


async def test_a_continued_greedy_answer_equals_the_uninterrupted_one_token_for_token(engine):
    total = 32
    full_ids, full_text, whole = await generate(engine, chat(total))
    assert whole.completion_tokens == total == len(full_ids)
    # The lost engine had sent the tokens up to a word boundary (the client has that text).
    cut = next(i for i in range(total // 2, total) if engine.tokenizer.decode(full_ids[i:i + 1]).startswith(" "))
    head = engine.tokenizer.decode(full_ids[:cut])
    assert full_text.startswith(head)
    rest_ids, rest_text, fin = await generate(engine, chat(total - cut, continuation=head))
    assert rest_ids == full_ids[cut:]  # the same tokens, in the same places
    assert head + rest_text == full_text
    # Billed: the prompt as the uninterrupted request had it, and only the tokens generated here.
    assert (fin.prompt_tokens, fin.completion_tokens) == (whole.prompt_tokens, total - cut)
