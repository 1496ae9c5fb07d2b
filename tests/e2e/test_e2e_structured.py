"""Structured outputs through the official OpenAI SDK against the whole platform (edge, scheduler, engine).

For the transformers and the llama.cpp engine: 50 seeds at temperature 1.0, every ``json_schema``
answer validates against its schema and every ``json_object`` answer that ends parses (one cut by
``max_tokens`` says ``length``); vLLM's ``structured_outputs`` extras (choice, regex); every refused
field answers 400 naming it; and a burst of schemas that cannot be served leaves the engine serving.
"""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest

from services.common.model_store import DEFAULT_MODEL_ID
from tests.support import CyUp, state_dir_with_models

# 50 real generations per test on a shared 2-CPU host: minutes, not seconds, when the machine is busy.
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(2400)]

SEEDS = range(50)
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"enum": ["red", "green", "blue"]},
        "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
        "pets": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                    "required": ["city"], "additionalProperties": False},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "colour", "code", "pets", "address", "active"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]
ENGINES = ["transformers", "llamacpp"]


@pytest.fixture(scope="module", params=ENGINES)
def platform(request, tmp_path_factory, default_model_dir):
    """The platform with one engine of the kind asked for."""
    if request.param == "llamacpp":
        pytest.importorskip("llama_cpp", reason="the llama.cpp engine needs the [llamacpp] extra")
    state = state_dir_with_models(tmp_path_factory.mktemp(request.param), default_model_dir)
    with CyUp(state, "--engine", request.param, "--no-trainer") as up:
        yield up


# 50 requests queue behind 8 slots: on a busy host the last ones wait longer than the edge's default
# request timeout (600 s), so these requests carry a longer one of their own (the ``timeout`` extra).
DEADLINE = 1800


def client(up: CyUp) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{up.url}/v1", api_key="unused", max_retries=0, timeout=DEADLINE)


async def ask(api: openai.AsyncOpenAI, seed: int, **kwargs):
    extra = {"cache": False, "timeout": DEADLINE, **kwargs.pop("extra_body", {})}
    reply = await api.chat.completions.create(model=DEFAULT_MODEL_ID, messages=ASK, temperature=1.0, seed=seed,
                                              extra_body=extra, **kwargs)
    return reply.choices[0]


async def test_every_json_schema_answer_validates_at_temperature_one(platform):
    api = client(platform)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    choices = await asyncio.gather(*(ask(api, seed, response_format=fmt, max_tokens=300) for seed in SEEDS))
    for seed, choice in zip(SEEDS, choices):
        assert choice.finish_reason == "stop", (seed, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    assert len({c.message.content for c in choices}) > 1  # sampled, not one answer forced


async def test_every_json_object_answer_parses_and_a_cut_one_says_length(platform):
    api = client(platform)
    choices = await asyncio.gather(*(ask(api, seed, response_format={"type": "json_object"}, max_tokens=64)
                                     for seed in SEEDS))
    for seed, choice in zip(SEEDS, choices):
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict), (seed, choice.message.content)
        else:  # cut inside the value by max_tokens: reported as such, never passed off as a whole answer
            assert choice.finish_reason == "length"
            with pytest.raises(json.JSONDecodeError):
                json.loads(choice.message.content)
    cut = await ask(api, 0, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
                    max_tokens=4)
    assert cut.finish_reason == "length" and cut.message.content.startswith("{")


async def test_vllm_style_choice_and_regex_extras_and_a_streamed_schema(platform):
    api = client(platform)
    for seed in range(5):
        choice = await ask(api, seed, max_tokens=20, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
        assert (choice.message.content, choice.finish_reason) in {("yes", "stop"), ("no", "stop")}
        coded = await ask(api, seed, max_tokens=20, extra_body={"structured_outputs": {"regex": "[A-Z]{3}-[0-9]{2}"}})
        assert len(coded.message.content) == 6 and coded.message.content[3] == "-", coded.message.content
    stream = await api.chat.completions.create(
        model=DEFAULT_MODEL_ID, messages=ASK, temperature=1.0, seed=3, max_tokens=300, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
        extra_body={"cache": False})
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    jsonschema.validate(json.loads(text), PERSON)
    completion = await api.completions.create(model=DEFAULT_MODEL_ID, prompt="A colour:", max_tokens=10, seed=1,
                                              extra_body={"cache": False, "response_format": {
                                                  "type": "json_schema", "json_schema": {"name": "c", "schema": {
                                                      "type": "object", "properties": {"c": {"enum": ["red", "blue"]}},
                                                      "required": ["c"], "additionalProperties": False}}}})
    assert json.loads(completion.choices[0].text)["c"] in ("red", "blue")


REFUSED = [
    ("tools[0].type", {"tools": [{"type": "custom", "custom": {"name": "f"}}]}),
    ("modalities", {"modalities": ["text", "audio"]}),
    ("audio", {"audio": {"voice": "alloy", "format": "wav"}}),
    ("reasoning_effort", {"reasoning_effort": "low"}),
    ("web_search_options", {"web_search_options": {}}),
    ("verbosity", {"extra_body": {"verbosity": "low"}}),
    ("something_new", {"extra_body": {"something_new": 1}}),
    ("response_format.json_schema.schema", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "string"}}, "not": {}}}}}),
]


@pytest.mark.parametrize(("param", "fields"), REFUSED, ids=[p for p, _ in REFUSED])
async def test_each_refused_field_answers_400_naming_it(platform, param, fields):
    fields = dict(fields)
    extra = {"cache": False, **fields.pop("extra_body", {})}
    with pytest.raises(openai.BadRequestError) as info:
        await client(platform).chat.completions.create(model=DEFAULT_MODEL_ID, messages=ASK, max_tokens=4,
                                                       extra_body=extra, **fields)
    error = info.value.body
    assert (error["code"], error["param"]) == ("unsupported", param), error


async def test_a_burst_of_bad_constraints_leaves_the_engine_serving(platform):
    api = client(platform)
    bad = [{"structured_outputs": {"regex": "(("}}, {"structured_outputs": {"grammar": "start: undefined_rule"}},
           {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
               "type": "object", "patternProperties": {"^a": {}}}}}}]

    async def refused(body: dict) -> openai.BadRequestError:
        with pytest.raises(openai.BadRequestError) as info:
            await api.chat.completions.create(model=DEFAULT_MODEL_ID, messages=ASK, max_tokens=8,
                                              extra_body={"cache": False, **body})
        return info.value

    errors = await asyncio.gather(*(refused(bad[i % len(bad)]) for i in range(24)))
    assert {e.body["code"] for e in errors} == {"invalid_request", "unsupported"}
    fine = await ask(api, 1, max_tokens=20, extra_body={"structured_outputs": {"choice": ["ok"]}})
    assert (fine.message.content, fine.finish_reason) == ("ok", "stop")
    free = await ask(api, 1, max_tokens=8)
    assert free.message.content and free.finish_reason in ("stop", "length")
