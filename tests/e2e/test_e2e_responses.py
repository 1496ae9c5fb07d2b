"""``/v1/responses`` on the platform as a user starts it (``cy up``, authenticated bus, the real default model).

The Responses API is a translation of chat completions: at temperature 0 a response says exactly
what the chat completion of the same conversation says, streamed or not, and a
``previous_response_id`` chain is the conversation of its turns. Every request sends
``cache: false`` and the engine's own counter proves each answer was generated.
"""

from __future__ import annotations

import json

import openai
import pytest

from services.common.model_store import DEFAULT_MODEL_ID
from tests.support import CyUp, state_dir_with_models

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

QUESTION = "What is the capital of France? Answer in one sentence."
FOLLOW_UP = "And of Italy?"
NO_CACHE = {"cache": False}
TOKENS = 24


@pytest.fixture(scope="module")
def platform(tmp_path_factory, default_model_dir):
    """The platform with the transformers engine and no trainer."""
    state = state_dir_with_models(tmp_path_factory.mktemp("responses"), default_model_dir)
    with CyUp(state, "--no-trainer", "--engine", "transformers") as up:
        yield up


def client(up: CyUp) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{up.url}/v1", api_key="unused", max_retries=0, timeout=300)


async def chat_text(api: openai.AsyncOpenAI, messages: list[dict]) -> str:
    """What chat completions answers to ``messages`` (greedy, not from the cache)."""
    reply = await api.chat.completions.create(model=DEFAULT_MODEL_ID, messages=messages, temperature=0,
                                              max_completion_tokens=TOKENS, extra_body=NO_CACHE)
    return reply.choices[0].message.content


async def test_a_response_says_what_the_chat_completion_says(platform):
    api = client(platform)
    before = await platform.generated_tokens()
    response = await api.responses.create(model=DEFAULT_MODEL_ID, input=QUESTION, temperature=0,
                                          max_output_tokens=TOKENS, extra_body=NO_CACHE)
    generated = await platform.generated_tokens() - before
    assert response.status in ("completed", "incomplete") and response.output_text
    assert response.usage.output_tokens == generated > 0
    assert response.output_text == await chat_text(api, [{"role": "user", "content": QUESTION}])
    assert (await api.responses.retrieve(response.id)).output_text == response.output_text
    assert platform.bus_refusals() == []


async def test_a_streamed_response_and_its_follow_up_match_the_chat_conversation(platform):
    api = client(platform)
    before = await platform.generated_tokens()
    stream = await api.responses.create(model=DEFAULT_MODEL_ID, input=QUESTION, temperature=0,
                                        max_output_tokens=TOKENS, stream=True, extra_body=NO_CACHE)
    events = [event async for event in stream]
    assert events[0].type == "response.created" and events[-1].type in ("response.completed",
                                                                         "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    first = events[-1].response
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == first.output_text and first.usage.output_tokens == await platform.generated_tokens() - before
    assert first.output_text == await chat_text(api, [{"role": "user", "content": QUESTION}])

    second = await api.responses.create(model=DEFAULT_MODEL_ID, input=FOLLOW_UP, previous_response_id=first.id,
                                        temperature=0, max_output_tokens=TOKENS, extra_body=NO_CACHE)
    conversation = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": first.output_text},
                    {"role": "user", "content": FOLLOW_UP}]
    assert second.output_text == await chat_text(api, conversation)
    assert second.usage.input_tokens > first.usage.input_tokens  # the first turn is in its prompt
    items = await api.responses.input_items.list(second.id)
    assert [(i.role, i.content[0].text) for i in items.data] == [("user", FOLLOW_UP)]
    assert platform.bus_refusals() == []


WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}}


async def test_a_function_call_streamed_and_whole_and_its_output_continues_the_conversation(platform):
    api = client(platform)
    ask = dict(model=DEFAULT_MODEL_ID, input="What is the weather in Paris?", tools=[WEATHER], tool_choice="required",
               temperature=0, max_output_tokens=64, extra_body=NO_CACHE)
    whole = await api.responses.create(**ask)
    calls = [item for item in whole.output if item.type == "function_call"]
    assert whole.status == "completed" and len(calls) == 1, whole.output
    call = calls[0]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    assert set(json.loads(call.arguments)) == {"city"}  # the grammar holds the arguments to the schema

    events = [event async for event in await api.responses.create(**ask, stream=True)]
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    added = [e for e in events if e.type == "response.output_item.added" and e.item.type == "function_call"]
    assert len(added) == 1 and added[0].item.name == "get_weather" and added[0].item.arguments == ""
    fragments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert kinds.index("response.output_item.added") < kinds.index("response.function_call_arguments.delta") \
        < kinds.index("response.function_call_arguments.done")
    assert fragments == done[0].arguments == call.arguments  # greedy: the same call as the whole answer
    streamed = events[-1].response
    assert [(i.type, i.call_id) for i in streamed.output if i.type == "function_call"] == \
        [("function_call", added[0].item.call_id)]
    assert (await api.responses.retrieve(streamed.id)).output[-1].arguments == call.arguments

    result = await api.responses.create(
        model=DEFAULT_MODEL_ID, previous_response_id=whole.id, tools=[WEATHER], tool_choice="none", temperature=0,
        max_output_tokens=TOKENS, extra_body=NO_CACHE,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 degrees."}])
    assert result.status in ("completed", "incomplete") and result.output_text
    assert [i.type for i in result.output] == ["message"]
    items = await api.responses.input_items.list(result.id)
    assert [i.type for i in items.data] == ["function_call_output"]
    assert platform.bus_refusals() == []
