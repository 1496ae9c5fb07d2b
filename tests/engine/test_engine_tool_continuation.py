"""A migrated tool call on the transformers backend: the tools' grammar rides the continuation path of every
constraint, so an answer cut mid-call and continued elsewhere is still one valid call."""

from __future__ import annotations

import json

import jsonschema
import msgspec
import pytest
import pytest_asyncio

from services.common.tool_format import split_answer
from services.engine.backend import Chunk, Finished
from services.engine.backends import backend_class
from services.edge.openai.translate import parse_chat, to_request

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(default_model_dir):
    eng = backend_class("transformers")(model_path=default_model_dir, model_id="m", slots=2)
    await eng.start()
    yield eng
    await eng.close()


def request(temperature: float, seed: int):
    body = {"model": "m", "messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 80,
            "temperature": temperature, "seed": seed, "tool_choice": "required", "parallel_tool_calls": False,
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]}
    return to_request(parse_chat(json.dumps(body).encode()), request_id=f"t-{seed}", model="m", reply_to="x",
                      created=0, deadline=1e12)


async def generate(engine, req) -> tuple[list[int], str, Finished]:
    ids, text, fin = [], "", None
    async for ev in engine.generate(req):
        if isinstance(ev, Chunk):
            ids.extend(ev.token_ids)
            text += ev.text
        else:
            fin = ev
    return ids, text, fin


@pytest.mark.parametrize(("temperature", "seed"), [(0.0, 0), (1.0, 1), (1.0, 2)])
async def test_a_call_cut_mid_arguments_and_continued_is_one_valid_call(engine, temperature, seed):
    req = request(temperature, seed)
    ids, whole, fin = await generate(engine, req)
    assert fin.reason == "stop"
    cut = len(ids) // 2  # inside the arguments: past the tag and the name
    head = engine.tokenizer.decode(ids[:cut])
    assert '"arguments":' in head and whole.startswith(head)
    moved = msgspec.structs.replace(req, id=f"{req.id}-moved", continuation=head,
                                    sampling=msgspec.structs.replace(req.sampling, max_tokens=80 - cut))
    _, rest, end = await generate(engine, moved)
    assert end.reason == "stop"
    text, [call] = split_answer(head + rest)
    assert text == "" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    if temperature == 0:
        assert head + rest == whole
