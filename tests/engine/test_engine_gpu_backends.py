"""The TensorRT-LLM, MindIE and MLX backends: their pure parts and lifecycle.

None of these engines can run here (no NVIDIA GPU, no Ascend NPU, no Apple silicon), so what is
tested is OUR code: mapping our sampling parameters to each library's, translating its outputs
to chunks and finish events, error mapping, start without the library, generate before start.
Streaming and abort go through the TEST DOUBLES in ``tests/fake_engine_libraries.py``, which
mimic the shapes the libraries' sources document; they do not test the libraries themselves.
"""

from __future__ import annotations

import asyncio
import random
import sys
import uuid
from types import SimpleNamespace

import msgspec
import pytest
from transformers import AutoTokenizer

from schemas import ChatMessage, InferenceRequest, SamplingParams
from schemas.errors import BusError, ErrorCode
from services.engine.backend import Chunk, Finished
from services.engine.backends import backend_class
from services.engine.backends import mindie
from services.engine.backends import mlx
from services.engine.backends import tensorrt_llm as trt
from services.engine.backends.library import EngineLibraryMissing
from services.engine.text.prompt import check_context, render_prompt
from services.engine.text.deltas import TextStream
from tests.fake_engine_libraries import FakeLLM, FakeMindIEServer, FakeMlx, fake_tensorrt_llm_modules


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir)


def chat(content="Tell me about the sea.", **sampling) -> InferenceRequest:
    return InferenceRequest(id=f"g-{uuid.uuid4().hex[:10]}", model="m", reply_to="unused",
                            messages=[ChatMessage(role="user", content=content)], sampling=SamplingParams(**sampling))


async def collect(engine, req):
    chunks, fin = [], None
    async for ev in engine.generate(req):
        if isinstance(ev, Chunk):
            chunks.append(ev)
        else:
            fin = ev
    return "".join(c.text for c in chunks), chunks, fin


# --- shared pure parts --------------------------------------------------------------------------

def test_text_stream_holds_back_a_possible_stop_string_with_its_token_ids():
    s = TextStream(["END"])
    assert s.push("Hello ", [1]) == Chunk("Hello ", [1])
    assert s.push("E", [2]) is None  # might be the start of END
    assert s.push("x", [3]) == Chunk("Ex", [2, 3])
    assert s.push(" EN", [4]) == Chunk(" ", [4])
    assert s.push("D tail", [5]) is None and s.stopped
    # Like the transformers engine: ids behind the cut text still go out (usage counts them), with no text.
    assert s.finish() == Chunk("", [5])
    assert s.tokens == 5


def test_text_stream_finish_releases_held_text():
    s = TextStream(["STOP"])
    assert s.push("ab S", [1, 2]) == Chunk("ab ", [1, 2])
    assert s.finish() == Chunk("S", [])


def test_render_prompt_is_the_chat_template_and_bills_no_continuation(tokenizer):
    req = chat("Hi there")
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}], add_generation_prompt=True,
                                             tokenize=True)["input_ids"]
    assert render_prompt(tokenizer, req).ids == list(expected)
    cont = render_prompt(tokenizer, msgspec.structs.replace(req, continuation=" The sea is"))
    assert cont.ids[:len(expected)] == list(expected) and len(cont.ids) > len(expected)
    assert cont.billed == len(expected)
    completion = InferenceRequest(id="c", model="m", reply_to="x", prompt="Once upon")
    assert render_prompt(tokenizer, completion).ids == tokenizer.encode("Once upon")


def test_check_context_refuses_a_prompt_that_fills_the_context():
    check_context(10, 11)
    with pytest.raises(BusError) as info:
        check_context(11, 11)
    assert info.value.code == ErrorCode.CONTEXT_LENGTH_EXCEEDED


# --- TensorRT-LLM: pure parts -------------------------------------------------------------------

def test_trt_greedy_is_top_k_1_with_temperature_and_top_p_unset():
    kw = trt.sampling_kwargs(SamplingParams(temperature=0.0, top_p=0.5, top_k=40, seed=7), 16)
    assert kw["top_k"] == 1 and "temperature" not in kw and "top_p" not in kw
    assert kw["max_tokens"] == 16 and kw["seed"] == 7


def test_trt_sampling_maps_every_parameter():
    p = SamplingParams(max_tokens=99, temperature=0.7, top_p=0.9, top_k=50, seed=3, stop=["\n\n", "END"],
                       presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.2)
    assert trt.sampling_kwargs(p, 40) == {
        "max_tokens": 40, "n": 1, "detokenize": True, "skip_special_tokens": True, "temperature": 0.7,
        "top_p": 0.9, "top_k": 50, "seed": 3, "stop": ["\n\n", "END"], "repetition_penalty": 1.2,
        "presence_penalty": 0.5, "frequency_penalty": 0.25}


def test_trt_leaves_neutral_values_unset_and_draws_a_seed_when_none():
    kw = trt.sampling_kwargs(SamplingParams(temperature=1.0), 8, rng=random.Random(1))
    assert set(kw) == {"max_tokens", "n", "detokenize", "skip_special_tokens", "temperature", "seed"}
    # TensorRT-LLM's unset seed is a fixed 0: "no seed" must still vary between requests.
    other = trt.sampling_kwargs(SamplingParams(temperature=1.0), 8, rng=random.Random(2))
    assert kw["seed"] != other["seed"] and 0 <= kw["seed"] < 2**63


def test_trt_llm_kwargs():
    assert trt.llm_kwargs("/m", slots=4, context_length=0, dtype="auto") == {
        "model": "/m", "max_batch_size": 4, "dtype": "auto"}
    assert trt.llm_kwargs("/m", slots=4, context_length=2048, dtype="bfloat16")["max_seq_len"] == 2048


def _completion(text, ids, last_text=0, last_ids=0, reason=None):
    return SimpleNamespace(text=text, text_diff=text[last_text:], token_ids_diff=ids[last_ids:], token_ids=ids,
                           finish_reason=reason, stop_reason=None)


def test_trt_output_translation_deltas_and_finish():
    s = TextStream([])
    assert trt.output_events(_completion("Hel", [1]), s, 9) == [Chunk("Hel", [1])]
    events = trt.output_events(_completion("Hello!", [1, 2, 3], 3, 1, "length"), s, 9)
    assert events == [Chunk("lo!", [2, 3]), Finished("length", 9, 3)]
    s = TextStream([])
    assert trt.output_events(_completion("a", [1], reason="stop"), s, 2)[-1] == Finished("stop", 2, 1)


def test_trt_held_back_text_of_a_stop_string_trt_trimmed_is_not_sent():
    s = TextStream(["world"])
    assert trt.output_events(_completion("Hello wor", [1, 2]), s, 4) == [Chunk("Hello ", [1, 2])]
    # TensorRT-LLM matched "world" itself: final text trimmed, text_diff empty, stop_reason the string.
    final = SimpleNamespace(text="Hello ", text_diff="", token_ids_diff=[], token_ids=[1, 2],
                            finish_reason="stop", stop_reason="world")
    assert trt.output_events(final, s, 4) == [Finished("stop", 4, 2)]
    # When it ended on EOS instead, the held-back text was real output.
    s = TextStream(["world"])
    trt.output_events(_completion("Hello wor", [1, 2]), s, 4)
    eos = SimpleNamespace(text="Hello wor", text_diff="", token_ids_diff=[], token_ids=[1, 2],
                          finish_reason="stop", stop_reason=None)
    assert trt.output_events(eos, s, 4) == [Chunk("wor", []), Finished("stop", 4, 2)]


def test_trt_output_translation_cuts_a_stop_string_the_engine_streamed():
    s = TextStream(["world"])
    assert trt.output_events(_completion("Hello wor", [1, 2]), s, 4) == [Chunk("Hello ", [1, 2])]
    events = trt.output_events(_completion("Hello world and", [1, 2, 3, 4], 9, 2), s, 4)
    assert events == [Chunk("", [3, 4]), Finished("stop", 4, 4)]


@pytest.mark.parametrize(("reason", "code"), [("cancelled", ErrorCode.CANCELLED), ("timeout", ErrorCode.TIMEOUT)])
def test_trt_cancelled_and_timeout_are_typed_errors(reason, code):
    with pytest.raises(BusError) as info:
        trt.output_events(_completion("", [], reason=reason), TextStream([]), 1)
    assert info.value.code == code


def test_trt_error_mapping():
    too_long = ValueError("The sum of prompt length (9000.0), query length (0) should not exceed max_num_tokens (8192)")
    assert trt.map_error(too_long).code == ErrorCode.CONTEXT_LENGTH_EXCEEDED
    assert trt.map_error(ValueError("best_of (1) cannot be less than n (2)")).code == ErrorCode.INVALID_REQUEST
    assert trt.map_error(RuntimeError("LLM is shutting down")).code == ErrorCode.ENGINE_FAILED
    assert "boom" in trt.map_error(RuntimeError("boom")).message


# --- MindIE: pure parts -------------------------------------------------------------------------

def test_mindie_body_maps_every_parameter_and_sends_token_ids():
    p = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, seed=3, stop=["END"], presence_penalty=0.5,
                       frequency_penalty=0.25, repetition_penalty=1.2)
    # Stop strings are applied on our side (a streamed delta cannot show a server-side trim), not sent.
    assert mindie.completion_body("qwen", [1, 2, 3], p, 30) == {
        "model": "qwen", "prompt": [1, 2, 3], "max_tokens": 30, "stream": True, "temperature": 0.7, "seed": 3,
        "top_p": 0.9, "top_k": 50, "presence_penalty": 0.5, "frequency_penalty": 0.25, "repetition_penalty": 1.2}


def test_mindie_body_omits_values_it_rejects_as_off():
    body = mindie.completion_body("m", [1], SamplingParams(temperature=1.0, top_k=0, top_p=1.0), 5,
                                  rng=random.Random(0))
    assert "top_k" not in body and "top_p" not in body  # MindIE rejects top_k 0
    assert 0 <= body["seed"] < 2**63
    greedy = mindie.completion_body("m", [1], SamplingParams(temperature=0.0, top_k=5, top_p=0.5, seed=1), 5)
    assert greedy["temperature"] == 0.0 and "top_k" not in greedy and "top_p" not in greedy


def test_mindie_sse_parsing():
    assert mindie.parse_sse_line(b'data: {"choices": []}\n') == {"choices": []}
    assert mindie.parse_sse_line(b"data: [DONE]\n") is mindie.DONE
    assert mindie.parse_sse_line(b"\n") is None and mindie.parse_sse_line(b": keep-alive\n") is None
    with pytest.raises(BusError) as info:
        mindie.parse_sse_line(b"data: {oops\n")
    assert info.value.code == ErrorCode.ENGINE_FAILED


def test_mindie_chunk_translation_uses_the_servers_usage():
    s = TextStream([])
    assert mindie.chunk_events({"choices": [{"text": "Hi", "finish_reason": None}]}, s, 7) == [Chunk("Hi", [])]
    last = {"choices": [{"text": "!", "finish_reason": "length"}], "usage": {"prompt_tokens": 7,
                                                                            "completion_tokens": 2}}
    assert mindie.chunk_events(last, s, 7) == [Chunk("!", []), Finished("length", 7, 2)]
    with pytest.raises(BusError):
        mindie.chunk_events({"error": {"message": "NPU out of memory"}}, TextStream([]), 1)


@pytest.mark.parametrize(("status", "body", "code"), [
    (422, '{"error": "Prompt text length must be in [1, 4096], but got 9000"}', ErrorCode.CONTEXT_LENGTH_EXCEEDED),
    (400, '{"error": "Parameter top_k must be in -1 || (0,2147483647], got 0"}', ErrorCode.INVALID_REQUEST),
    (404, "not found", ErrorCode.MODEL_NOT_FOUND),
    (503, "busy", ErrorCode.ENGINE_BUSY),
    (500, "internal", ErrorCode.ENGINE_FAILED),
])
def test_mindie_http_error_mapping(status, body, code):
    assert mindie.map_http_error(status, body).code == code


def test_mindie_served_model_name():
    models = {"data": [{"id": "llama3-8b"}]}
    assert mindie.pick_served_model(models, "llama3-8b") == "llama3-8b"
    assert mindie.pick_served_model(models, "my-alias") == "llama3-8b"
    with pytest.raises(RuntimeError, match="modelName"):
        mindie.pick_served_model({"data": [{"id": "a"}, {"id": "b"}]}, "c")


# --- MLX: pure parts ----------------------------------------------------------------------------

def test_mlx_sampler_and_processor_arguments():
    assert mlx.sampler_kwargs(SamplingParams(temperature=0.0, top_k=5)) == {"temp": 0.0}
    assert mlx.sampler_kwargs(SamplingParams(temperature=0.8, top_p=0.9, top_k=20)) == {
        "temp": 0.8, "top_p": 0.9, "top_k": 20}
    assert mlx.logits_processor_kwargs(SamplingParams(), 10) == {}
    p = SamplingParams(max_tokens=64, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2)
    assert mlx.logits_processor_kwargs(p, 10) == {
        "repetition_penalty": 1.3, "repetition_context_size": 74, "presence_penalty": 0.5,
        "presence_context_size": 64, "frequency_penalty": 0.2, "frequency_context_size": 64}


def _resp(text, token, n, reason=None):
    return SimpleNamespace(text=text, token=token, generation_tokens=n, finish_reason=reason)


def test_mlx_translation_does_not_count_the_eos():
    t = mlx.OutputTranslator([], prompt_tokens=5)
    assert t.events(_resp("Hi", 11, 1)) == [Chunk("Hi", [11])]
    # mlx_lm's last response on EOS: the EOS token, the detokenizer's remaining text, generation_tokens n+1.
    assert t.events(_resp("!", 2, 2, "stop")) == [Chunk("!", []), Finished("stop", 5, 1)] and t.done


def test_mlx_translation_length_counts_the_last_token():
    t = mlx.OutputTranslator([], prompt_tokens=5)
    t.events(_resp("a", 1, 1))
    assert t.events(_resp("b", 2, 2, "length")) == [Chunk("b", [2]), Finished("length", 5, 2)]


def test_mlx_translation_stop_string():
    t = mlx.OutputTranslator(["##"], prompt_tokens=1)
    assert t.events(_resp("x #", 1, 1)) == [Chunk("x ", [1])]
    assert t.events(_resp("# y", 2, 2)) == [Chunk("", [2]), Finished("stop", 1, 2)] and t.done


# --- lifecycle without the libraries ------------------------------------------------------------

@pytest.mark.parametrize("name", ["tensorrt-llm", "mindie", "mlx"])
def test_registry_imports_each_backend_without_its_library(name):
    cls = backend_class(name)
    assert cls.name == name
    assert "tensorrt_llm" not in sys.modules and "mlx_lm" not in sys.modules


@pytest.mark.parametrize(("engine", "module", "package"), [
    (trt.TensorRTLLMEngine, "tensorrt_llm", "tensorrt-llm"),
    (mlx.MlxEngine, "mlx_lm", "mlx-lm"),
])
async def test_start_without_the_library_names_the_package(monkeypatch, tmp_path, engine, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError, installed or not
    eng = engine(model_path=tmp_path, model_id="m")
    with pytest.raises(EngineLibraryMissing) as info:
        await eng.start()
    assert module in str(info.value) and "pip install" in str(info.value) and package in str(info.value)


async def test_mindie_start_without_a_server_says_where_it_looked(default_model_dir, unused_tcp_port):
    eng = mindie.MindIEEngine(model_path=default_model_dir, model_id="m", url=f"http://127.0.0.1:{unused_tcp_port}")
    with pytest.raises(RuntimeError) as info:
        await eng.start()
    assert f"127.0.0.1:{unused_tcp_port}" in str(info.value) and "mindieservice_daemon" in str(info.value)


@pytest.mark.parametrize("engine", [trt.TensorRTLLMEngine, mindie.MindIEEngine, mlx.MlxEngine])
async def test_generate_and_health_before_start_are_typed_errors(tmp_path, engine):
    eng = engine(model_path=tmp_path, model_id="m")
    with pytest.raises(BusError) as info:
        await collect(eng, chat())
    assert info.value.code == ErrorCode.ENGINE_FAILED
    with pytest.raises(BusError):
        await eng.check_health()


# --- our code paths driven by the test doubles --------------------------------------------------

@pytest.fixture
def fake_trt(monkeypatch):
    for name, module in fake_tensorrt_llm_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    return FakeLLM


async def test_trt_streams_through_generate_async(fake_trt, default_model_dir, tokenizer):
    fake_trt.script, fake_trt.finish, fake_trt.step_delay = tokenizer.encode(" The sea is blue"), "stop", 0.0
    eng = trt.TensorRTLLMEngine(model_path=default_model_dir, model_id="m", slots=3)
    await eng.start()
    llm = fake_trt.instances[-1]
    assert llm.kwargs == {"model": str(default_model_dir), "max_batch_size": 3, "dtype": "auto"}
    await eng.check_health()
    req = chat(max_tokens=20, temperature=0.0)
    text, chunks, fin = await collect(eng, req)
    call = llm.calls[-1]
    assert call["streaming"] is True and call["lora_request"] is None
    assert call["inputs"] == render_prompt(tokenizer, req).ids
    assert call["sampling_params"].kwargs["top_k"] == 1
    assert text == " The sea is blue" and len(chunks) == len(fake_trt.script)
    assert fin == Finished("stop", len(call["inputs"]), len(fake_trt.script))
    await eng.close()
    with pytest.raises(BusError):
        await eng.check_health()


async def test_trt_abort_cancels_in_the_engine(fake_trt, default_model_dir, tokenizer):
    fake_trt.script, fake_trt.step_delay = tokenizer.encode(" wave") * 50, 0.01
    eng = trt.TensorRTLLMEngine(model_path=default_model_dir, model_id="m")
    await eng.start()
    req = chat(max_tokens=100)
    gen = eng.generate(req)
    assert isinstance(await gen.__anext__(), Chunk)
    await eng.abort(req.id)
    with pytest.raises(BusError) as info:
        while True:
            await asyncio.wait_for(gen.__anext__(), 5)
    assert info.value.code == ErrorCode.CANCELLED
    assert fake_trt.instances[-1].results[-1].aborted_calls >= 1
    await eng.close()


async def test_trt_stop_string_aborts_the_engine_request(fake_trt, default_model_dir, tokenizer):
    fake_trt.script, fake_trt.step_delay = tokenizer.encode(" one two three four five"), 0.0
    eng = trt.TensorRTLLMEngine(model_path=default_model_dir, model_id="m")
    await eng.start()
    text, _, fin = await collect(eng, chat(max_tokens=20, stop=["three"]))
    assert text == " one two " and fin.reason == "stop"
    assert fake_trt.instances[-1].results[-1].aborted_calls == 1  # the engine stops generating too
    await eng.close()


async def test_trt_adapters_are_refused_without_lora(fake_trt, default_model_dir):
    eng = trt.TensorRTLLMEngine(model_path=default_model_dir, model_id="m")
    with pytest.raises(BusError) as info:
        await eng.check_adapter("my-lora")
    assert info.value.code == ErrorCode.UNSUPPORTED and "--adapter-dir" in info.value.message


@pytest.fixture
def fake_mlx(monkeypatch, tokenizer):
    fake = FakeMlx(tokenizer, tokenizer.encode(" Waves roll in"), eos=tokenizer.eos_token_id)
    for name, module in fake.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    return fake


async def test_mlx_streams_one_request_at_a_time(fake_mlx, default_model_dir, tokenizer):
    eng = mlx.MlxEngine(model_path=default_model_dir, model_id="m", slots=4)
    await eng.start()
    await eng.check_health()
    assert eng.slots == 1 and eng.memory_bytes() == 12345
    req = chat(max_tokens=20, temperature=0.5, top_p=0.9, seed=42, repetition_penalty=1.1)
    text, chunks, fin = await collect(eng, req)
    prompt = render_prompt(tokenizer, req).ids
    assert text == " Waves roll in" and fin == Finished("stop", len(prompt), len(fake_mlx.script))
    assert fake_mlx.generate_calls[-1]["prompt"] == prompt and fake_mlx.seeds == [42]
    assert fake_mlx.sampler_calls[-1] == {"temp": 0.5, "top_p": 0.9}
    assert fake_mlx.processor_calls[-1]["repetition_penalty"] == 1.1
    results = await asyncio.gather(*[collect(eng, chat(max_tokens=3)) for _ in range(3)])
    assert all(fin.reason == "length" and fin.completion_tokens == 3 for _, _, fin in results)
    assert fake_mlx.max_running == 1
    await eng.close()


async def test_mlx_abort_stops_at_the_next_token(fake_mlx, default_model_dir, tokenizer):
    fake_mlx.script, fake_mlx.step_delay = tokenizer.encode(" on") * 200, 0.005
    eng = mlx.MlxEngine(model_path=default_model_dir, model_id="m")
    await eng.start()
    req = chat(max_tokens=200)
    gen = eng.generate(req)
    assert isinstance(await gen.__anext__(), Chunk)
    await eng.abort(req.id)
    with pytest.raises(BusError) as info:
        while True:
            await asyncio.wait_for(gen.__anext__(), 5)
    assert info.value.code == ErrorCode.CANCELLED
    for _ in range(100):  # the model thread notices at its next token and closes the generator
        if fake_mlx.closed:
            break
        await asyncio.sleep(0.01)
    assert fake_mlx.closed == 1 and len(fake_mlx.generate_calls) == 1
    _, _, fin = await collect(eng, chat(max_tokens=2))  # and serves the next request
    assert fin.completion_tokens == 2
    await eng.close()


async def test_mindie_streams_from_the_server(default_model_dir, tokenizer):
    async with FakeMindIEServer("llama3", ["The", " sea", " is", " wide"], finish="stop") as server:
        eng = mindie.MindIEEngine(model_path=default_model_dir, model_id="m", url=server.url)
        await eng.start()
        await eng.check_health()
        req = chat(max_tokens=16, temperature=0.0, stop=["zzz"])
        text, _, fin = await collect(eng, req)
        body = server.bodies[-1]
        assert body["model"] == "llama3" and body["prompt"] == render_prompt(tokenizer, req).ids
        assert body["stream"] is True and "stop" not in body and body["temperature"] == 0.0
        assert text == "The sea is wide" and fin == Finished("stop", len(body["prompt"]), 4)
        assert server.disconnects == 0  # a natural end reads the stream to [DONE]
        await eng.close()


async def test_mindie_stop_string_is_cut_here_and_ends_the_request_in_the_server(default_model_dir):
    async with FakeMindIEServer("llama3", ["The", " sea", " is", " wide"] + [" and"] * 200,
                                step_delay=0.005) as server:
        eng = mindie.MindIEEngine(model_path=default_model_dir, model_id="m", url=server.url)
        await eng.start()
        text, _, fin = await collect(eng, chat(max_tokens=300, stop=[" is w"]))
        assert text == "The sea" and fin.reason == "stop" and fin.completion_tokens == 4
        for _ in range(100):
            if server.disconnects:
                break
            await asyncio.sleep(0.01)
        assert server.disconnects == 1
        await eng.close()


async def test_mindie_abort_closes_the_stream(default_model_dir):
    async with FakeMindIEServer("llama3", ["x"] * 500, step_delay=0.01) as server:
        eng = mindie.MindIEEngine(model_path=default_model_dir, model_id="m", url=server.url)
        await eng.start()
        req = chat(max_tokens=500)
        gen = eng.generate(req)
        assert isinstance(await gen.__anext__(), Chunk)
        await eng.abort(req.id)
        with pytest.raises(BusError) as info:
            while True:
                await asyncio.wait_for(gen.__anext__(), 5)
        assert info.value.code == ErrorCode.CANCELLED
        for _ in range(100):  # MindIE stops a request whose client went away
            if server.disconnects:
                break
            await asyncio.sleep(0.01)
        assert server.disconnects == 1
        await eng.close()


async def test_mindie_http_error_is_typed(default_model_dir):
    async with FakeMindIEServer("llama3", [], status=400,
                                error_body='{"error": "Parameter seed must be in [0, 9223372036854775807]"}') as server:
        eng = mindie.MindIEEngine(model_path=default_model_dir, model_id="m", url=server.url)
        await eng.start()
        with pytest.raises(BusError) as info:
            await collect(eng, chat())
        assert info.value.code == ErrorCode.INVALID_REQUEST and "seed" in info.value.message
        await eng.close()
