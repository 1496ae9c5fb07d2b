"""Fine-tuned model names, adapter-aware engine choice and the model list: pure, no NATS."""

from __future__ import annotations

import pytest

from schemas.errors import BusError, ErrorCode
from schemas.heartbeat import EngineHeartbeat, ServedModel
from schemas.inference import InferenceRequest
from schemas.registry import ADAPTER, ModelEntry
from services.common.model_ref import adapter_model_id, split_model
from services.common.worker_table import WorkerState, WorkerTable
from services.edge.openai.catalog import FINE_TUNE_OWNER, model_objects
from services.scheduler.placement import Placement
from services.scheduler.strategies import prefer_adapter

SERVED = {"SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "llama3:8b"}


def served(name: str) -> bool:
    return name in SERVED


@pytest.mark.parametrize("name,adapter,expected", [
    ("SmolLM2-135M-Instruct", None, ("SmolLM2-135M-Instruct", None)),
    ("SmolLM2-135M-Instruct:ft-mybot-abc123", None, ("SmolLM2-135M-Instruct", "ft-mybot-abc123")),
    ("SmolLM2-135M-Instruct", "ft-mybot-abc123", ("SmolLM2-135M-Instruct", "ft-mybot-abc123")),
    ("SmolLM2-135M-Instruct:ft-a", "ft-a", ("SmolLM2-135M-Instruct", "ft-a")),  # both, agreeing
    ("HuggingFaceTB/SmolLM2-135M-Instruct:v1.2_x", None, ("HuggingFaceTB/SmolLM2-135M-Instruct", "v1.2_x")),
    ("llama3:8b", None, ("llama3:8b", None)),  # a served id with ':' is never split
    ("llama3:8b:ft-a", None, ("llama3:8b", "ft-a")),
])
def test_model_names_split_into_base_and_adapter(name, adapter, expected):
    assert split_model(name, adapter, served) == expected


@pytest.mark.parametrize("name,adapter,param", [
    ("SmolLM2-135M-Instruct:ft-a", "ft-b", "adapter"),  # conflicting adapters
    ("SmolLM2-135M-Instruct:bad/id", None, "model"),
    ("SmolLM2-135M-Instruct:", None, "model"),
    (":ft-a", None, "model"),
    ("SmolLM2-135M-Instruct", "../x", "adapter"),
])
def test_bad_or_conflicting_adapter_names_are_invalid_requests(name, adapter, param):
    with pytest.raises(BusError) as info:
        split_model(name, adapter, served)
    assert info.value.code == ErrorCode.INVALID_REQUEST and info.value.param == param


def test_adapter_model_id_round_trips():
    assert adapter_model_id("b", "ft-1") == "b:ft-1" and adapter_model_id("b", None) == "b"
    assert split_model(adapter_model_id("SmolLM2-135M-Instruct", "ft-1"), None, served) == \
        ("SmolLM2-135M-Instruct", "ft-1")


def hb(worker: str, *, slots: int = 4, in_flight: int = 0, adapters: tuple[str, ...] = (),
       draining: bool = False) -> EngineHeartbeat:
    return EngineHeartbeat(worker=worker, engine="t", device="cpu", models=[ServedModel(id="m")], slots=slots,
                           in_flight=in_flight, seq=1, ts=0.0, interval=1.0, adapters=list(adapters),
                           draining=draining, started=1000.0)


def state(worker: str, **kw) -> WorkerState:
    beat = hb(worker, **kw)
    return WorkerState(heartbeat=beat, last_seen=0.0, in_flight=beat.in_flight, seq=beat.seq)


def test_an_engine_holding_the_adapter_is_preferred_when_not_much_busier():
    a, b = state("a", in_flight=1, adapters=("ft-x",)), state("b", in_flight=0)
    assert [s.worker for s in prefer_adapter([a, b], "ft-x")] == ["a"]
    assert [s.worker for s in prefer_adapter([a, b], "ft-y")] == ["a", "b"]  # nobody holds it: all stay
    assert [s.worker for s in prefer_adapter([a, b], None)] == ["a", "b"]


def test_a_much_busier_holder_loses_to_load_balance():
    a, b = state("a", in_flight=3, adapters=("ft-x",)), state("b", in_flight=0)  # 3/4 vs 0/4 > slack
    assert [s.worker for s in prefer_adapter([a, b], "ft-x")] == ["a", "b"]
    # Reservations count as load too.
    a, b = state("a", in_flight=1, adapters=("ft-x",)), state("b", in_flight=0)
    assert [s.worker for s in prefer_adapter([a, b], "ft-x", reserved={"a": 2})] == ["a", "b"]


def table_of(*beats: EngineHeartbeat) -> WorkerTable:
    table = WorkerTable(clock=lambda: 0.0)
    for beat in beats:
        table.observe(beat)
    return table


def test_placement_sends_adapter_requests_to_the_engine_that_has_it_loaded():
    placement = Placement(table_of(hb("a", in_flight=1), hb("b", in_flight=1, adapters=("ft-x",)), hb("c")))
    req = InferenceRequest(id="r", model="m", reply_to="x", adapter="ft-x", prompt="hi")
    assert placement.reserve("m", request=req) == "b"
    plain = InferenceRequest(id="r2", model="m", reply_to="x", prompt="hi")
    assert placement.reserve("m", request=plain) == "c"  # least connections without an adapter


def test_model_list_shows_fine_tuned_models_from_heartbeats_and_the_registry():
    table = table_of(hb("a", adapters=("ft-live",)))
    registry = [ModelEntry(id="ft-reg", kind=ADAPTER, base="m", source="artifact:adapters/ft-reg", created_at=5),
                ModelEntry(id="ft-other", kind=ADAPTER, base="not-served", source="artifact:adapters/ft-other")]
    models = model_objects(table, registry)
    assert sorted(models) == ["m", "m:ft-live", "m:ft-reg"]
    assert models["m:ft-reg"]["owned_by"] == FINE_TUNE_OWNER and models["m:ft-reg"]["parent"] == "m"
    assert models["m:ft-reg"]["created"] == 5
