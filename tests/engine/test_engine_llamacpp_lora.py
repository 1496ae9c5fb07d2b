"""PEFT LoRA adapters on the llama.cpp engine: the GGUF conversion against peft, per-request adapters in one batch,
refusals, the LRU bound."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from schemas.errors import BusError, ErrorCode
from services.common.model_store import default_model_gguf
from services.engine.backend import AdapterChange
from tests.lora_support import chat, make_adapter, make_misfit_lora, token_ids
from tests.scheduler.test_scheduler_harness import eventually

pytest.importorskip("llama_cpp", reason="the llama.cpp engine needs the [llamacpp] extra")
pytestmark = [pytest.mark.slow]

# Token ids of an arbitrary short text; the conversion check looks at the logits of every position.
IDS = [1, 504, 3458, 282, 8820, 314, 253, 1789, 30, 2, 905, 2000]


def make_qk_adapter(base_dir: Path, out: Path) -> Path:
    """A LoRA on q_proj/k_proj only: the layers whose rows the GGUF conversion permutes."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "k_proj"], init_lora_weights=False,
                        task_type=TaskType.CAUSAL_LM)
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory, default_model_dir) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    for name, method, seed in [("lora-a", "lora", 1), ("lora-b", "lora", 2), ("lora-c", "lora", 3),
                               ("dora-d", "dora", 4), ("ia3-e", "ia3", 5), ("prefix-g", "prefix", 7)]:
        make_adapter(default_model_dir, root / name, method, seed)
    make_qk_adapter(default_model_dir, root / "lora-qk")
    make_misfit_lora(default_model_dir, root / "broken-shape")
    return root


async def start_engine(adapter_root: Path, max_adapters: int = 8):
    from services.engine.backends import backend_class

    eng = backend_class("llamacpp")(model_path=default_model_gguf(), model_id="m", slots=8,
                                    adapter_dirs=[str(adapter_root)], adapter_cache_dir=adapter_root / "cache",
                                    max_adapters=max_adapters)
    eng.changes = []
    eng.adapter_listener = eng.changes.append
    await eng.start()
    return eng


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(adapter_root):
    eng = await start_engine(adapter_root)
    yield eng
    await eng.close()




def llama_logits(gguf_lora: Path | None) -> np.ndarray:
    """Logits at every position of IDS from llama.cpp, with the GGUF LoRA applied through our own loader."""
    import llama_cpp

    from services.engine.backends.llamacpp.adapter_slots import GgufLoras
    from services.engine.backends.llamacpp.model import ContextShape, GgufModel

    model = GgufModel(default_model_gguf(), ContextShape(n_seq=1, ctx_per_seq=64))
    model.load()
    loras = GgufLoras(model, 1)
    batch = llama_cpp.llama_batch_init(len(IDS), 0, 1)
    try:
        if gguf_lora is not None:
            loras.ensure("x", gguf_lora, set())
            loras.apply("x")
        for i, token in enumerate(IDS):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, True
            batch.seq_id[i][0] = 0
        batch.n_tokens = len(IDS)
        assert llama_cpp.llama_decode(model.ctx, batch) == 0
        return np.stack([np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(model.ctx, i), shape=(model.n_vocab,))
                         for i in range(len(IDS))]).copy()
    finally:
        loras.close()
        llama_cpp.llama_batch_free(batch)
        model.close()


def peft_logits(base_dir: Path, adapter_dir: Path | None) -> np.ndarray:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    with torch.inference_mode():
        return model(torch.tensor([IDS])).logits[0].numpy()


def test_converted_lora_moves_llama_cpp_logits_as_peft_moves_the_fp32_model(default_model_dir, adapter_root,
                                                                            tmp_path):
    """The change the adapter makes to llama.cpp's logits (on the Q4_1 GGUF) follows the change peft makes to
    the float32 model. A conversion without the rotary row permutation of q/k scores about 0.4 here."""
    from services.engine.backends.llamacpp.lora_convert import converted_adapter, read_base_header

    adapter = adapter_root / "lora-qk"
    gguf_lora = converted_adapter(adapter, "lora-qk", default_model_gguf(), read_base_header(default_model_gguf()),
                                  tmp_path)
    ours = (llama_logits(gguf_lora) - llama_logits(None)).ravel()
    theirs = (peft_logits(default_model_dir, adapter) - peft_logits(default_model_dir, None)).ravel()
    assert np.linalg.norm(theirs) > 100  # the adapter really moves the logits
    assert np.corrcoef(ours, theirs)[0, 1] > 0.95


def test_peft_scaling_is_folded_into_b(adapter_root, tmp_path):
    """lora_alpha / r, rsLoRA's alpha / sqrt(r) and per-module alpha_pattern all end up in B (alpha is written 0)."""
    from safetensors.numpy import load_file

    from services.engine.backends.llamacpp.lora_convert import lora_tensors, read_base_header

    header = read_base_header(default_model_gguf())
    source = adapter_root / "lora-a"
    raw = load_file(str(source / "adapter_model.safetensors"))
    b_key = next(k for k in raw if "layers.0.self_attn.v_proj.lora_B" in k)
    variants = {"plain": ({}, 64 / 8), "rslora": ({"use_rslora": True}, 64 / 8 ** 0.5),
                "pattern": ({"alpha_pattern": {"v_proj": 2}}, 2 / 8)}
    for name, (extra, scale) in variants.items():
        target = tmp_path / name
        target.mkdir()
        config = json.loads((source / "adapter_config.json").read_text()) | extra
        (target / "adapter_config.json").write_text(json.dumps(config))
        (target / "adapter_model.safetensors").symlink_to(source / "adapter_model.safetensors")
        tensors = lora_tensors(target, name, header)
        np.testing.assert_allclose(tensors["blk.0.attn_v.weight.lora_b"].astype(np.float32), raw[b_key] * scale,
                                   rtol=2e-3, atol=1e-4)
        assert tensors["blk.0.attn_v.weight.lora_a"].shape == (8, 576)


@pytest.mark.parametrize("change, expected", [
    ({"use_dora": True}, "DoRA"), ({"bias": "all"}, "bias"), ({"modules_to_save": ["lm_head"]}, "modules"),
    ({"peft_type": "IA3"}, "IA3"), ({"target_parameters": ["x"]}, "target_parameters")])
def test_configs_llama_cpp_cannot_apply_are_unsupported(change, expected):
    from services.engine.backends.llamacpp.lora_convert import check_config

    with pytest.raises(BusError) as info:
        check_config({"peft_type": "LORA", "bias": "none"} | change, "x")
    assert info.value.code == ErrorCode.UNSUPPORTED and expected in info.value.message
    assert info.value.param == "adapter"


@pytest.mark.asyncio(loop_scope="module")
async def test_concurrent_adapters_and_base_each_get_their_own_output(engine):
    """One batch holds base and adapter rows; every request gets exactly what it gets alone."""
    solo = {a: await token_ids(engine, chat(a)) for a in (None, "lora-a", "lora-b")}
    assert len({tuple(v) for v in solo.values()}) == 3, "adapters must change the output"
    mix = [None, "lora-a", "lora-b", "lora-a", None, "lora-b", "lora-b"]
    for _ in range(2):
        got = await asyncio.gather(*(token_ids(engine, chat(a)) for a in mix))
        assert got == [solo[a] for a in mix]
    assert {"lora-a", "lora-b"} <= set(engine.loaded_adapters())


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("adapter", ["dora-d", "ia3-e", "prefix-g"])
async def test_other_peft_methods_are_refused_before_and_at_generation(engine, adapter):
    with pytest.raises(BusError) as info:
        await engine.check_adapter(adapter)
    assert info.value.code == ErrorCode.UNSUPPORTED and info.value.param == "adapter"
    with pytest.raises(BusError) as info:
        await token_ids(engine, chat(adapter, max_tokens=2))
    assert info.value.code == ErrorCode.UNSUPPORTED


@pytest.mark.asyncio(loop_scope="module")
async def test_unknown_adapter_is_model_not_found(engine):
    with pytest.raises(BusError) as info:
        await engine.check_adapter("no-such-adapter")
    assert info.value.code == ErrorCode.MODEL_NOT_FOUND


@pytest.mark.asyncio(loop_scope="module")
async def test_broken_adapter_fails_its_request_only(engine):
    base = await token_ids(engine, chat(None, max_tokens=6))
    with pytest.raises(BusError) as info:
        await token_ids(engine, chat("broken-shape", max_tokens=6))
    assert info.value.code == ErrorCode.INVALID_REQUEST and "576" in info.value.message
    assert await token_ids(engine, chat(None, max_tokens=6)) == base


@pytest.mark.asyncio(loop_scope="module")
async def test_lru_bound_evicts_idle_adapters_and_never_a_busy_one(adapter_root):
    eng = await start_engine(adapter_root, max_adapters=2)
    try:
        solo = {a: await token_ids(eng, chat(a, max_tokens=8)) for a in ("lora-c", "lora-a", "lora-b")}
        # lora-b's load evicted lora-c, the least recently used
        assert eng.loaded_adapters() == ["lora-a", "lora-b"]
        # Two long requests keep both adapters busy; lora-c waits for one of them, then evicts it.
        running = [asyncio.Event(), asyncio.Event()]
        long = [asyncio.create_task(token_ids(eng, chat(a, max_tokens=40), started))
                for a, started in zip(("lora-a", "lora-b"), running)]
        await asyncio.gather(*(started.wait() for started in running))  # both generating: both adapters busy
        assert await token_ids(eng, chat("lora-c", max_tokens=8)) == solo["lora-c"]
        # Greedy: a busy adapter evicted under its request would change the rest of its answer.
        assert [ids[:8] for ids in await asyncio.gather(*long)] == [solo["lora-a"], solo["lora-b"]]
        changes: list[AdapterChange] = eng.changes  # they reach the loop with call_soon_threadsafe
        await eventually(lambda: sum(c.loads for c in changes) == 4, what="the fourth adapter load")
        assert sum(c.loads for c in changes) == 4 and sum(c.evictions for c in changes) == 2
        assert "lora-c" in eng.loaded_adapters() and len(eng.loaded_adapters()) == 2
    finally:
        await eng.close()
