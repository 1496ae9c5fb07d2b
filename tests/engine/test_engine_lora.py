"""PEFT adapters on the transformers engine: per-request adapters inside continuous batching, LRU, errors."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import pytest_asyncio

from schemas.errors import BusError, ErrorCode
from services.engine.backends.transformers.engine import TransformersEngine
from tests.lora_support import chat, make_adapter, make_misfit_lora, token_ids

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]



@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory, default_model_dir) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    for name, method, seed in [("lora-a", "lora", 1), ("lora-b", "lora", 2), ("lora-c", "lora", 3),
                               ("dora-d", "dora", 4), ("ia3-e", "ia3", 5), ("loha-f", "loha", 6),
                               ("prefix-g", "prefix", 7)]:
        make_adapter(default_model_dir, root / name, method, seed)
    make_misfit_lora(default_model_dir, root / "broken-shape")
    bad = root / "bad-config"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": "eight"}))
    return root


async def start_engine(default_model_dir, adapter_root, max_adapters: int = 8) -> TransformersEngine:
    eng = TransformersEngine(model_path=default_model_dir, model_id="m", slots=6, adapter_dirs=[str(adapter_root)],
                             adapter_cache_dir=adapter_root / "cache", max_adapters=max_adapters)
    await eng.start()
    return eng


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(default_model_dir, adapter_root):
    eng = await start_engine(default_model_dir, adapter_root)
    yield eng
    await eng.close()




def peft_reference(default_model_dir, adapter_dir: Path, engine, max_tokens: int) -> list[int]:
    """Greedy tokens from plain transformers + peft, one request alone: what the adapter should say."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32),
                                      str(adapter_dir)).eval()
    ids = torch.tensor([engine.render(chat()).ids])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             do_sample=False)
    return out[0, ids.shape[1]:].tolist()


async def test_concurrent_adapters_and_base_each_get_their_own_output(engine, default_model_dir, adapter_root):
    solo = {a: await token_ids(engine, chat(a)) for a in (None, "lora-a", "lora-b")}
    assert len({tuple(v) for v in solo.values()}) == 3, "adapters must change the output"
    reference = await asyncio.to_thread(peft_reference, default_model_dir, adapter_root / "lora-a", engine, 16)
    assert solo["lora-a"][:len(reference)] == reference
    order = ["lora-a", None, "lora-b", "lora-b", None, "lora-a"]
    together = await asyncio.wait_for(asyncio.gather(*[token_ids(engine, chat(a)) for a in order]), 120)
    assert together == [solo[a] for a in order]
    assert set(engine.loaded_adapters()) >= {"lora-a", "lora-b"}


@pytest.mark.parametrize("adapter", ["ia3-e", "loha-f", "dora-d"])
async def test_non_lora_methods_are_served_next_to_the_base(engine, adapter):
    base = await token_ids(engine, chat())
    alone = await token_ids(engine, chat(adapter))
    assert alone != base
    both = await asyncio.wait_for(asyncio.gather(token_ids(engine, chat(adapter)), token_ids(engine, chat()),
                                                 token_ids(engine, chat("lora-a"))), 120)
    assert both[0] == alone and both[1] == base
    assert adapter in engine.loaded_adapters() or "lora-a" in engine.loaded_adapters()


async def test_unknown_adapter_is_model_not_found(engine):
    with pytest.raises(BusError) as info:
        await engine.check_adapter("no-such-adapter")
    assert info.value.code == ErrorCode.MODEL_NOT_FOUND and "no-such-adapter" in info.value.message
    with pytest.raises(BusError) as info:
        await token_ids(engine, chat("no-such-adapter"))
    assert info.value.code == ErrorCode.MODEL_NOT_FOUND
    with pytest.raises(BusError) as info:
        await engine.check_adapter("../etc")
    assert info.value.code == ErrorCode.INVALID_REQUEST


async def test_prompt_learning_adapters_are_refused_as_unsupported(engine):
    with pytest.raises(BusError) as info:
        await token_ids(engine, chat("prefix-g"))
    assert info.value.code == ErrorCode.UNSUPPORTED and "PREFIX_TUNING" in info.value.message


@pytest.mark.parametrize("adapter", ["broken-shape", "bad-config"])
async def test_broken_adapter_is_a_typed_error_and_the_engine_keeps_serving(engine, adapter):
    base = await token_ids(engine, chat())
    lora_a = await token_ids(engine, chat("lora-a"))
    with pytest.raises(BusError) as info:
        await asyncio.wait_for(token_ids(engine, chat(adapter)), 60)
    assert info.value.code == ErrorCode.INVALID_REQUEST and adapter in info.value.message
    assert adapter not in engine.loaded_adapters()
    assert await token_ids(engine, chat()) == base
    assert await token_ids(engine, chat("lora-a")) == lora_a


async def test_lru_bound_evicts_the_least_recently_used_idle_adapter(default_model_dir, adapter_root):
    eng = await start_engine(default_model_dir, adapter_root, max_adapters=2)
    changes = []
    eng.adapter_listener = changes.append
    try:
        first = {a: await token_ids(eng, chat(a, max_tokens=6)) for a in ("lora-a", "lora-b")}
        assert eng.loaded_adapters() == ["lora-a", "lora-b"]
        await token_ids(eng, chat("lora-a", max_tokens=6))  # lora-b is now the least recently used
        await token_ids(eng, chat("lora-c", max_tokens=6))
        assert eng.loaded_adapters() == ["lora-a", "lora-c"]
        assert sum(c.loads for c in changes) == 3 and sum(c.evictions for c in changes) == 1
        # Reloaded after eviction, lora-b still says the same.
        assert await token_ids(eng, chat("lora-b", max_tokens=6)) == first["lora-b"]
        assert eng.loaded_adapters() == ["lora-c", "lora-b"]
    finally:
        await eng.close()


async def test_a_busy_adapter_is_never_evicted(default_model_dir, adapter_root):
    eng = await start_engine(default_model_dir, adapter_root, max_adapters=1)
    try:
        solo = {a: await token_ids(eng, chat(a, max_tokens=24)) for a in ("lora-a", "ia3-e")}
        # One slot for adapters: ia3-e (another peft method, too) waits until lora-a's request is done.
        together = await asyncio.wait_for(asyncio.gather(token_ids(eng, chat("lora-a", max_tokens=24)),
                                                         token_ids(eng, chat("ia3-e", max_tokens=24)),
                                                         token_ids(eng, chat(max_tokens=8))), 120)
        assert together[:2] == [solo["lora-a"], solo["ia3-e"]]
        assert eng.loaded_adapters() == ["ia3-e"]
    finally:
        await eng.close()
