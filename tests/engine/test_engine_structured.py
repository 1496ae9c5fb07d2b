"""Constrained decoding and logit_bias in the engines that sample themselves (transformers, llama.cpp),
the grammar compiler's cache and time limit, and the refusal of engines that cannot constrain."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
import pytest_asyncio

from schemas.errors import BusError
from schemas.inference import ChatMessage, InferenceRequest, SamplingParams, StructuredOutput
from services.common.model_store import default_model_gguf
from services.engine.backend import Chunk, Finished
from services.engine.backends import backend_class
from services.engine.grammar.compiler import GrammarCompiler

# The model is real and the host shared: generous per-test limits, sized for a loaded 2-CPU machine.
pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(900)]

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}


def request(structured: StructuredOutput | None = None, content: str = "Describe a person.", **sampling):
    sampling.setdefault("max_tokens", 60)
    return InferenceRequest(id=f"g-{uuid.uuid4().hex[:12]}", model="m", reply_to="unused", structured=structured,
                            messages=[ChatMessage(role="user", content=content)], sampling=SamplingParams(**sampling))


async def run(engine, req) -> tuple[str, list[int], Finished]:
    text, ids, fin = "", [], None
    async for ev in engine.generate(req):
        if isinstance(ev, Chunk):
            text, ids = text + ev.text, ids + ev.token_ids
        else:
            fin = ev
    return text, ids, fin


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["transformers", "llamacpp"])
async def engine(request, default_model_dir):
    if request.param == "llamacpp":
        pytest.importorskip("llama_cpp", reason="the llama.cpp engine needs the [llamacpp] extra")
        eng = backend_class("llamacpp")(model_path=default_model_gguf(), model_id="m", slots=8)
    else:
        eng = backend_class("transformers")(model_path=default_model_dir, model_id="m", slots=8, device="cpu")
    await eng.start()
    yield eng
    await eng.close()


async def test_json_schema_choice_and_regex_hold_at_temperature_one(engine):
    schema = StructuredOutput(kind="json_schema", json=json.dumps(SCHEMA))
    answers = await asyncio.gather(*(run(engine, request(schema, temperature=1.0, seed=s)) for s in range(4)))
    for text, _, fin in answers:
        assert fin.reason == "stop", text
        value = json.loads(text)
        assert set(value) == {"name", "age"} and 0 <= value["age"] <= 99 and len(value["name"]) <= 16
    choice = StructuredOutput(kind="choice", choice=["left", "right"])
    regex = StructuredOutput(kind="regex", regex="[a-z]{4}-[0-9]{3}")
    for seed in range(2):
        text, _, fin = await run(engine, request(choice, temperature=1.0, seed=seed))
        assert text in ("left", "right") and fin.reason == "stop"
        text, _, _ = await run(engine, request(regex, temperature=1.0, seed=seed))
        assert len(text) == 8 and text[:4].isalpha() and text[4] == "-" and text[5:].isdigit(), text


async def test_free_rows_in_a_batch_with_constrained_ones_are_unchanged(engine):
    free = [request(content=f"Tell me about the number {i}.", temperature=0, max_tokens=8) for i in range(2)]
    alone = [(await run(engine, r))[0] for r in free]
    constrained = [request(StructuredOutput(kind="json_object"), temperature=1.0, seed=i, max_tokens=12)
                   for i in range(2)]
    mixed = await asyncio.gather(*(run(engine, r) for r in [*free, *constrained]))
    assert [t for t, _, _ in mixed[:2]] == alone


async def test_a_json_value_cut_by_max_tokens_finishes_as_length(engine):
    text, _, fin = await run(engine, request(StructuredOutput(kind="json_schema", json=json.dumps(SCHEMA)),
                                             temperature=1.0, seed=1, max_tokens=3))
    assert fin.reason == "length" and text.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


async def test_logit_bias_forces_and_bans_tokens(engine):
    _, greedy, _ = await run(engine, request(temperature=0, max_tokens=3))
    _, banned, _ = await run(engine, request(temperature=0, max_tokens=3, logit_bias={greedy[0]: -100.0}))
    assert banned[0] != greedy[0]
    _, forced, _ = await run(engine, request(temperature=0, max_tokens=3, logit_bias={greedy[1]: 100.0}))
    assert forced == [greedy[1]] * 3
    with pytest.raises(BusError) as info:
        engine.check_request(request(logit_bias={10**9: 1.0}))
    assert (info.value.code, info.value.param) == ("invalid_request", "logit_bias")


async def test_a_constraint_the_library_cannot_compile_is_invalid_request(engine):
    for bad in (StructuredOutput(kind="regex", regex="(("), StructuredOutput(kind="grammar", grammar="start: nope")):
        with pytest.raises(BusError) as info:
            await run(engine, request(bad))
        assert (info.value.code, info.value.param) == ("invalid_request", "response_format")
    text, _, _ = await run(engine, request(StructuredOutput(kind="choice", choice=["still here"])))
    assert text == "still here"


async def test_engines_that_cannot_constrain_refuse_before_accepting():
    sim = backend_class("simulated")(model_id="m")
    for req, param in ((request(StructuredOutput(kind="json_object")), "response_format"),
                       (request(logit_bias={1: 1.0}), "logit_bias")):
        with pytest.raises(BusError) as info:
            sim.check_request(req)
        assert (info.value.code, info.value.param) == ("unsupported", param)
    sim.check_request(request())  # free text is served


@pytest.fixture(scope="module")
def tokenizer():
    import llguidance.hf
    from transformers import AutoTokenizer

    gguf = default_model_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return llguidance.hf.from_tokenizer(tok, n_vocab=len(tok)), len(tok)


async def test_compiles_are_cached_per_constraint_and_bounded(tokenizer):
    compiler = GrammarCompiler(*tokenizer, cache_bytes=2048)
    first = StructuredOutput(kind="json_schema", json=json.dumps(SCHEMA))
    grammar = await compiler.grammar(first)
    assert await compiler.grammar(first) == grammar and compiler.compiles == 1
    for i in range(100):
        await compiler.grammar(StructuredOutput(kind="choice", choice=[f"option {i}"]))
    assert 0 < compiler.cached_bytes <= 2048
    await compiler.grammar(first)  # evicted meanwhile (least recently used): compiled again
    assert compiler.compiles == 102


async def test_a_compile_past_the_time_limit_is_refused_and_remembered(tokenizer):
    compiler = GrammarCompiler(*tokenizer, time_limit=1e-6)
    slow = StructuredOutput(kind="json_schema", json=json.dumps(SCHEMA))
    for _ in range(2):
        with pytest.raises(BusError) as info:
            await compiler.grammar(slow)
        assert info.value.code == "invalid_request" and "longer than" in info.value.message
    assert compiler.compiles <= 1  # the second was refused without compiling again


async def test_vllm_gets_its_own_structured_outputs_params_and_logit_bias():
    pytest.importorskip("vllm", reason="the vllm engine needs the [vllm] extra")
    from services.engine.backends.vllm import vllm_sampling

    def mapped(structured: StructuredOutput):
        return vllm_sampling(SamplingParams(logit_bias={5: -2.0}), 8, structured).structured_outputs

    params = vllm_sampling(SamplingParams(logit_bias={5: -2.0}), 8)
    assert params.logit_bias == {5: -2.0} and params.structured_outputs is None
    schema = mapped(StructuredOutput(kind="json_schema", json='{"type":"object"}'))
    assert schema.json == '{"type":"object"}' and schema.disable_any_whitespace
    assert mapped(StructuredOutput(kind="json_object")).json_object is True
    assert mapped(StructuredOutput(kind="regex", regex="a+")).regex == "a+"
    assert mapped(StructuredOutput(kind="choice", choice=["a", "b"])).choice == ["a", "b"]
    assert mapped(StructuredOutput(kind="grammar", grammar="start: \"a\"")).grammar == "start: \"a\""


async def test_vllm_enforces_structured_outputs_and_refuses_a_bad_regex(default_model_dir):
    pytest.importorskip("vllm", reason="the vllm engine needs the [vllm] extra")
    from services.engine.backends.vllm import VllmEngine

    engine = VllmEngine(model_path=default_model_dir, model_id="m", slots=4, enable_lora=False)
    await engine.start()
    try:
        schema = StructuredOutput(kind="json_schema", json=json.dumps(SCHEMA))
        for seed in range(2):
            text, _, fin = await run(engine, request(schema, temperature=1.0, seed=seed))
            assert fin.reason == "stop" and set(json.loads(text)) == {"name", "age"}, text
        text, _, _ = await run(engine, request(StructuredOutput(kind="choice", choice=["left", "right"]), seed=1))
        assert text in ("left", "right")
        with pytest.raises(BusError) as info:
            await run(engine, request(StructuredOutput(kind="regex", regex="((")))
        assert info.value.code == "invalid_request"
        text, _, _ = await run(engine, request(StructuredOutput(kind="choice", choice=["still here"])))
        assert text == "still here"
    finally:
        await engine.close()
