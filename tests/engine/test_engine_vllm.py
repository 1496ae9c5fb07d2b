"""The vLLM engine beyond the shared contract: per-request LoRA adapters, refused PEFT methods, constrained
output (also on an adapter), abort on close.

The contract itself (streaming, stop, seed, abort, usage...) runs on vLLM in test_engine_contract.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import msgspec
import pytest
import pytest_asyncio

from schemas.errors import BusError, ErrorCode
from services.engine.backend import AdapterChange, Chunk
from tests.lora_support import chat, make_adapter, make_misfit_lora, token_ids

pytest.importorskip("vllm", reason="the vllm engine needs the [vllm] extra")
pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]



@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory, default_model_dir) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    for name, method, seed in [("lora-a", "lora", 1), ("lora-b", "lora", 2), ("dora-d", "dora", 4),
                               ("ia3-e", "ia3", 5), ("prefix-g", "prefix", 7)]:
        make_adapter(default_model_dir, root / name, method, seed)
    make_misfit_lora(default_model_dir, root / "broken-shape")
    return root


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(default_model_dir, adapter_root):
    from services.engine.backends.vllm import VllmEngine

    eng = VllmEngine(model_path=default_model_dir, model_id="m", slots=6, adapter_dirs=[str(adapter_root)],
                     adapter_cache_dir=adapter_root / "cache", max_adapters=4)
    eng.changes = []
    eng.adapter_listener = eng.changes.append
    await eng.start()
    yield eng
    await eng.close()




def peft_reference(default_model_dir, adapter_dir: Path, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens from plain transformers + peft: what the adapter should say."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32),
                                      str(adapter_dir)).eval()
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             do_sample=False)
    return out[0, ids.shape[1]:].tolist()


async def test_concurrent_requests_with_different_adapters_get_their_own_output(engine, default_model_dir,
                                                                                 adapter_root):
    solo = {a: await token_ids(engine, chat(a)) for a in (None, "lora-a", "lora-b")}
    assert len({tuple(v) for v in solo.values()}) == 3, "adapters must change the output"
    reference = await asyncio.to_thread(peft_reference, default_model_dir, adapter_root / "lora-a",
                                        engine.render(chat()).ids, 16)
    assert solo["lora-a"] == reference
    order = ["lora-a", "lora-b", None, "lora-b", "lora-a", None]
    together = await asyncio.wait_for(asyncio.gather(*[token_ids(engine, chat(a)) for a in order]), 180)
    assert together == [solo[a] for a in order]
    # Heartbeats advertise what vLLM holds, and the service heard of each load.
    assert set(engine.loaded_adapters()) == {"lora-a", "lora-b"}
    assert all(isinstance(c, AdapterChange) for c in engine.changes)
    assert sum(c.loads for c in engine.changes) == 2 and engine.changes[-1].loaded == engine.loaded_adapters()


@pytest.mark.parametrize("adapter, method", [("dora-d", "DoRA"), ("ia3-e", "IA3"), ("prefix-g", "PREFIX_TUNING")])
async def test_non_lora_methods_are_unsupported(engine, adapter, method):
    with pytest.raises(BusError) as info:
        await engine.check_adapter(adapter)
    assert info.value.code == ErrorCode.UNSUPPORTED and method in info.value.message
    with pytest.raises(BusError) as info:
        await token_ids(engine, chat(adapter))
    assert info.value.code == ErrorCode.UNSUPPORTED


async def test_unknown_adapter_is_model_not_found(engine):
    with pytest.raises(BusError) as info:
        await engine.check_adapter("no-such-adapter")
    assert info.value.code == ErrorCode.MODEL_NOT_FOUND
    with pytest.raises(BusError) as info:
        await token_ids(engine, chat("no-such-adapter"))
    assert info.value.code == ErrorCode.MODEL_NOT_FOUND


async def test_broken_adapter_fails_its_request_only(engine):
    with pytest.raises(BusError) as info:
        await token_ids(engine, chat("broken-shape"))
    assert info.value.code == ErrorCode.INVALID_REQUEST and "broken-shape" in info.value.message
    await engine.check_health()
    assert len(await token_ids(engine, chat(max_tokens=4))) == 4
    assert "broken-shape" not in engine.loaded_adapters()


async def test_a_consumer_that_stops_reading_aborts_the_request_in_vllm(engine):
    gen = engine.generate(chat(max_tokens=400))
    assert isinstance(await gen.__anext__(), Chunk)
    assert engine.engine.get_num_unfinished_requests() == 1
    await gen.aclose()
    assert engine.engine.get_num_unfinished_requests() == 0


async def test_heartbeat_facts(engine, default_model_dir):
    (model,) = engine.served_models()
    assert model.id == "m" and model.context_length == 8192  # SmolLM2's max_position_embeddings
    from services.engine.backends.vllm import platform_of

    assert engine.slots == 6 and engine.device == platform_of("auto")
    assert engine.memory_bytes() > 500 * 2**20  # the fp32 weights live in vLLM's worker process


async def test_vllm_holds_structured_outputs_at_temperature_one(engine):
    # The same constraints as the engines that sample themselves (test_engine_structured.py), through
    # vLLM's own structured-output parameters, on the module's engine (LoRA on, adapters loaded).
    from tests.engine.test_engine_structured import SCHEMA, request, run
    from schemas.inference import StructuredOutput

    schema = StructuredOutput(kind="json_schema", json=json.dumps(SCHEMA))
    answers = await asyncio.wait_for(asyncio.gather(*(run(engine, request(schema, temperature=1.0, seed=s))
                                                      for s in range(4))), 300)
    for text, _, fin in answers:
        assert fin.reason == "stop", text
        value = json.loads(text)
        assert set(value) == {"name", "age"} and 0 <= value["age"] <= 99 and len(value["name"]) <= 16
    for seed in range(2):
        text, _, fin = await run(engine, request(StructuredOutput(kind="choice", choice=["left", "right"]),
                                                 temperature=1.0, seed=seed))
        assert text in ("left", "right") and fin.reason == "stop"
        text, _, _ = await run(engine, request(StructuredOutput(kind="regex", regex="[a-z]{4}-[0-9]{3}"),
                                               temperature=1.0, seed=seed))
        assert len(text) == 8 and text[:4].isalpha() and text[4] == "-" and text[5:].isdigit(), text
    cut, _, fin = await run(engine, request(schema, temperature=1.0, seed=1, max_tokens=3))
    assert fin.reason == "length" and cut.startswith("{")
    await engine.check_health()


async def test_constrained_requests_on_an_adapter_share_a_batch_with_free_ones(engine):
    # One batch holds constrained rows on an adapter and on the base model and a free row on an
    # adapter: each constraint holds on its own row, and the free row says what it says alone.
    from tests.engine.test_engine_structured import SCHEMA, request, run
    from schemas.inference import StructuredOutput

    schema = StructuredOutput(kind="json_schema", json=json.dumps(SCHEMA))
    choice = StructuredOutput(kind="choice", choice=["left", "right"])

    def on(adapter, req):
        return msgspec.structs.replace(req, adapter=adapter)

    free = chat("lora-b", max_tokens=24)
    alone = await token_ids(engine, chat("lora-b", max_tokens=24))
    outs = await asyncio.wait_for(asyncio.gather(
        run(engine, on("lora-a", request(schema, temperature=1.0, seed=3))),
        run(engine, on("lora-b", request(choice, temperature=1.0, seed=4))),
        run(engine, request(schema, temperature=1.0, seed=5)),
        token_ids(engine, free)), 300)
    for text, _, fin in (outs[0], outs[2]):
        assert fin.reason == "stop", text
        assert set(json.loads(text)) == {"name", "age"}, text
    assert outs[1][0] in ("left", "right") and outs[1][2].reason == "stop"
    assert outs[3] == alone
    await engine.check_health()


async def test_a_dead_engine_core_fails_health_and_requests_until_a_new_one_serves(engine):
    """Last in this module: it kills the module's engine core (the engine replaces it)."""
    import psutil

    before = await token_ids(engine, chat("lora-a"))
    held = engine.loaded_adapters()
    await engine.check_health()
    for child in psutil.Process().children(recursive=True):
        if "EngineCore" in " ".join(child.cmdline()) or "EngineCore" in child.name():
            child.kill()

    async def health() -> ErrorCode | None:
        try:
            await engine.check_health()
        except BusError as exc:
            return exc.code
        return None

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while (code := await health()) is None:
        assert loop.time() < deadline, "a killed engine core must fail the health check"
        await asyncio.sleep(0.2)
    assert code == ErrorCode.ENGINE_FAILED
    with pytest.raises(BusError) as info:
        await token_ids(engine, chat(max_tokens=4))
    assert info.value.code == ErrorCode.ENGINE_FAILED
    # A new engine core starts in the background; the engine serves again, adapters loaded on demand.
    deadline = loop.time() + 600
    while (code := await health()) is not None:
        assert code == ErrorCode.ENGINE_FAILED
        assert loop.time() < deadline, "the engine must replace its dead engine core"
        await asyncio.sleep(0.5)
    assert engine.changes[-1] == AdapterChange([], 0, len(held)) and engine.loaded_adapters() == []
    assert await token_ids(engine, chat("lora-a")) == before
    assert engine.loaded_adapters() == ["lora-a"]
