"""Tool calling through real clients (the official OpenAI SDK, the OpenAI Agents SDK, LangChain) against the
whole platform (edge, scheduler, engine), on the transformers and the llama.cpp engine.

Under ``tool_choice`` ``required`` or a named function the grammar makes every answer a call whose
arguments validate against that function's schema, for 20 seeds at temperature 1.0; a streamed answer
assembles into the whole one at temperature 0; a tool-result turn completes; ``auto`` answers text or
a valid call. The agent frameworks run with none of our code on the client side.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import jsonschema
import openai
import pytest

from services.common.model_store import DEFAULT_MODEL_ID
from tests.support import CyUp, state_dir_with_models

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(2400)]

SEEDS = range(20)
DEADLINE = 1800
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
# Both integers bounded: an unbounded one lets a sampled answer run past ``max_tokens`` (seen at temperature 1:
# a 60-digit "b", cut with ``length``), which is a valid answer but leaves no whole call to check.
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                   "b": {"type": "integer", "minimum": -1000, "maximum": 1000}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
TOOLS = [{"type": "function", "function": {"name": name, "description": f"the {name} function",
                                           "parameters": schema, "strict": True}}
         for name, schema in SCHEMAS.items()]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
ENGINES = ["transformers", "llamacpp"]


@pytest.fixture(scope="module", params=ENGINES)
def platform(request, tmp_path_factory, default_model_dir):
    """The platform with one engine of the kind asked for."""
    if request.param == "llamacpp":
        pytest.importorskip("llama_cpp", reason="the llama.cpp engine needs the [llamacpp] extra")
    state = state_dir_with_models(tmp_path_factory.mktemp(request.param), default_model_dir)
    with CyUp(state, "--engine", request.param, "--no-trainer") as up:
        yield up


def client(up: CyUp) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{up.url}/v1", api_key="unused", max_retries=0, timeout=DEADLINE)


async def ask(api: openai.AsyncOpenAI, seed: int, messages=ASK, temperature: float = 1.0, **kwargs):
    extra = {"cache": False, "timeout": DEADLINE}
    reply = await api.chat.completions.create(model=DEFAULT_MODEL_ID, messages=messages, temperature=temperature,
                                              seed=seed, tools=TOOLS, max_tokens=80, extra_body=extra, **kwargs)
    return reply.choices[0]


def assert_valid_calls(choice, names=tuple(SCHEMAS)) -> None:
    """Every call names a listed function and its arguments validate; with parallel calls an answer cut by
    ``max_tokens`` (``length``) may end inside its last call, which is then left out."""
    assert choice.message.tool_calls, choice
    calls = choice.message.tool_calls
    if choice.finish_reason == "length" and len(calls) > 1:
        calls = calls[:-1]
    else:
        assert choice.finish_reason == "tool_calls", choice
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names, call
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


async def test_required_gives_one_valid_call_for_every_seed_at_temperature_one(platform):
    api = client(platform)
    single = await asyncio.gather(*(ask(api, seed, tool_choice="required", parallel_tool_calls=False)
                                    for seed in SEEDS))
    for choice in single:
        assert_valid_calls(choice)
        assert len(choice.message.tool_calls) == 1
    assert len({c.message.tool_calls[0].function.arguments for c in single}) > 1  # sampled, not one call forced


async def test_a_named_choice_and_parallel_calls_stay_valid_at_temperature_one(platform):
    api = client(platform)
    named = {"type": "function", "function": {"name": "add"}}
    forced, parallel = await asyncio.gather(
        asyncio.gather(*(ask(api, seed, tool_choice=named, parallel_tool_calls=False) for seed in SEEDS[:10])),
        asyncio.gather(*(ask(api, seed, tool_choice="required") for seed in SEEDS[:10])))
    for choice in forced:
        assert_valid_calls(choice, names=("add",))
        assert len(choice.message.tool_calls) == 1
    for choice in parallel:
        assert_valid_calls(choice)


async def test_a_streamed_call_assembles_into_the_whole_answer_at_temperature_zero(platform):
    api = client(platform)
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        whole = await ask(api, 0, temperature=0, tool_choice=choice)
        assert_valid_calls(whole)
        stream = await api.chat.completions.create(
            model=DEFAULT_MODEL_ID, messages=ASK, temperature=0, seed=0, tools=TOOLS, tool_choice=choice,
            max_tokens=80, stream=True, extra_body={"cache": False})
        calls: dict[int, dict] = {}
        finish = None
        async for chunk in stream:
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            for part in delta.tool_calls or []:
                if part.id is not None:  # a call opens with its id, type and name, then arguments in fragments
                    assert part.index not in calls and part.function.name
                    calls[part.index] = {"id": part.id, "name": part.function.name, "arguments": ""}
                calls[part.index]["arguments"] += part.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "tool_calls"
        assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == [
            (c.function.name, c.function.arguments) for c in whole.message.tool_calls]


async def test_a_tool_result_turn_completes_and_auto_answers_text_or_a_valid_call(platform):
    api = client(platform)
    first = await ask(api, 1, temperature=0, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.message.tool_calls[0]
    chat = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                  {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}]
    for choice in ("none", "auto"):
        after = await ask(api, 1, messages=chat, temperature=0, tool_choice=choice)
        assert after.finish_reason in ("stop", "length", "tool_calls"), after
        if choice == "none":
            assert after.message.content and not after.message.tool_calls
    answers = await asyncio.gather(*(ask(api, seed, tool_choice="auto") for seed in range(8)))
    for answer in answers:
        if answer.message.tool_calls:
            assert_valid_calls(answer)
        else:
            assert answer.message.content and answer.finish_reason in ("stop", "length")


async def test_an_openai_agents_sdk_agent_calls_its_tool_and_finishes(platform):
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    seen: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        seen.append(city)
        return f"It is sunny and 21 degrees in {city}."

    model = agents.OpenAIChatCompletionsModel(model=DEFAULT_MODEL_ID, openai_client=client(platform))
    # The 135M model, left to choose after a result, calls the tool again and again: the run ends on the first
    # tool result (the Agents SDK's "stop_on_first_tool"), so the test is about the call, not the model's taste.
    agent = agents.Agent(name="weather", instructions="Answer questions about the weather.", tools=[get_weather],
                         model=model, tool_use_behavior="stop_on_first_tool", model_settings=agents.ModelSettings(
                             tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=60,
                             extra_body={"cache": False}))
    result = await agents.Runner.run(agent, "What is the weather in Paris?", max_turns=2)
    assert len(seen) == 1 and isinstance(seen[0], str)
    assert result.final_output == f"It is sunny and 21 degrees in {seen[0]}."


async def test_langchain_bind_tools_and_structured_output(platform):
    langchain_openai = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        """The weather in a city."""

        city: str = Field(max_length=20)
        celsius: int = Field(ge=-50, le=60)

    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return city

    llm = langchain_openai.ChatOpenAI(model=DEFAULT_MODEL_ID, base_url=f"{platform.url}/v1", api_key="unused",
                                      temperature=0, max_tokens=80, max_retries=0, extra_body={"cache": False})
    message = await llm.bind_tools([get_weather], tool_choice="get_weather").ainvoke("Weather in Paris?")
    assert [call["name"] for call in message.tool_calls] == ["get_weather"]
    assert isinstance(message.tool_calls[0]["args"]["city"], str)
    parsed = await llm.with_structured_output(Weather).ainvoke("Describe the weather in Paris.")
    assert isinstance(parsed, Weather) and -50 <= parsed.celsius <= 60


REPLY = {"type": "object", "properties": {"reply": {"type": "string", "maxLength": 30}}, "required": ["reply"],
         "additionalProperties": False}


async def test_legacy_functions_answer_with_one_valid_function_call(platform):
    api = client(platform)
    functions = [tool["function"] for tool in TOOLS]
    extra = {"cache": False, "timeout": DEADLINE, "functions": functions, "function_call": {"name": "get_weather"}}
    replies = await asyncio.gather(*(api.chat.completions.create(
        model=DEFAULT_MODEL_ID, messages=ASK, temperature=1.0, seed=seed, max_tokens=80, extra_body=extra)
        for seed in SEEDS[:6]))
    for reply in replies:
        choice = reply.choices[0]
        assert choice.finish_reason == "function_call" and not choice.message.tool_calls, choice
        assert choice.message.function_call.name == "get_weather"
        jsonschema.validate(json.loads(choice.message.function_call.arguments), WEATHER)
    call = replies[0].choices[0].message.function_call
    history = ASK + [{"role": "assistant", "content": None, "function_call": call.model_dump()},
                     {"role": "function", "name": "get_weather", "content": "sunny"}]
    after = await api.chat.completions.create(model=DEFAULT_MODEL_ID, messages=history, temperature=0, max_tokens=20,
                                              extra_body={**extra, "function_call": "none"})
    assert after.choices[0].message.content and after.choices[0].finish_reason in ("stop", "length")


async def test_a_result_for_an_unknown_call_id_is_refused_by_name(platform):
    chat = ASK + [{"role": "tool", "tool_call_id": "call_nowhere", "content": "sunny"}]
    with pytest.raises(openai.BadRequestError) as info:
        await ask(client(platform), 0, messages=chat)
    assert (info.value.body["code"], info.value.body["param"]) == ("invalid_request", "messages[1].tool_call_id")
    assert "call_nowhere" in info.value.body["message"]


async def test_auto_tools_with_a_json_schema_answer_json_or_a_valid_call(platform):
    fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": REPLY, "strict": True}}
    answers = await asyncio.gather(*(ask(client(platform), seed, response_format=fmt) for seed in SEEDS[:8]))
    for answer in answers:
        if answer.message.tool_calls:
            assert_valid_calls(answer)
        else:
            assert answer.finish_reason == "stop", answer
            jsonschema.validate(json.loads(answer.message.content), REPLY)


async def test_the_native_api_answers_with_valid_tool_calls(platform):
    body = {"modelId": DEFAULT_MODEL_ID, "messages": ASK, "tools": TOOLS, "toolChoice": "required",
            "parallelToolCalls": False, "cache": False, "timeout": DEADLINE,
            "generation": {"max_new_tokens": 80, "temperature": 0}}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{platform.url}/api/v1/inference", json=body) as resp:
            assert resp.status == 200, await resp.text()
            whole = await resp.json()
        async with http.post(f"{platform.url}/api/v1/inference/stream", json=body) as resp:
            events = [json.loads(line[6:]) for line in (await resp.text()).split("\n\n")
                      if line.startswith("data: {")]
    assert whole["finishReason"] == "tool_calls"
    [call] = whole["toolCalls"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])
    parts = [part for event in events for part in event.get("toolCalls", [])]
    assert (parts[0]["function"]["name"], "".join(p["function"]["arguments"] for p in parts)) == (
        call["function"]["name"], call["function"]["arguments"])
    assert events[-1]["done"] and events[-1]["finishReason"] == "tool_calls"
