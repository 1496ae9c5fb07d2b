"""Cold start: the scheduler has an engine load a registered model nobody serves, then dispatches to it."""

from __future__ import annotations

import asyncio
import time

from schemas import names
from schemas.control import LoadModel, decode_command
from schemas.errors import ErrorCode
from schemas.events import StreamEnd, StreamError, StreamStart
from schemas.heartbeat import EngineHeartbeat, ServedModel
from schemas.inference import SamplingParams
from schemas.registry import BASE, ModelEntry
from services.common import artifacts
from services.common.model_store import DEFAULT_MODEL_ID, model_dir
from services.common.worker_table import WorkerState
from services.common.load_placement import EVICT, FULL, ROOM, loader_candidates, room
from tests.engine_models_harness import real_engine, register
from tests.scheduler.test_scheduler_harness import ReplyInbox, eventually, new_request, start_scheduler, submit  # noqa: F401


def state(worker: str, *, engine: str = "transformers", models: tuple[int, ...] = (0,), max_models: int = 2,
          slots: int = 4, in_flight: int = 0, draining: bool = False) -> WorkerState:
    """An engine whose models have the given in-flight counts."""
    served = [ServedModel(id=f"m{i}", in_flight=n) for i, n in enumerate(models)]
    hb = EngineHeartbeat(worker=worker, engine=engine, device="cpu", models=served, slots=slots,
                         in_flight=in_flight, seq=1, ts=time.time(), max_models=max_models, draining=draining)
    return WorkerState(heartbeat=hb, last_seen=time.monotonic(), in_flight=in_flight, seq=1)


def test_engines_with_room_come_first_then_least_loaded():
    entry = ModelEntry(id="x", source="/m", format="safetensors")
    roomy_busy = state("a", models=(0,), in_flight=3)
    roomy_idle = state("b", models=(0,), in_flight=1)
    evictable = state("c", models=(0, 0), in_flight=0)
    full = state("d", models=(1, 2), in_flight=3)
    assert [room(s) for s in (roomy_busy, evictable, full)] == [ROOM, EVICT, FULL]
    workers = [roomy_busy, roomy_idle, evictable, full]
    assert [s.worker for s in loader_candidates(entry, workers)] == ["b", "a", "c"]
    assert [s.worker for s in loader_candidates(entry, workers, reserved={"b": 3})] == ["a", "b", "c"]
    assert [s.worker for s in loader_candidates(entry, workers, exclude={"b", "a"})] == ["c"]


def test_only_live_engines_of_a_fitting_kind_that_load_models_are_asked():
    gguf = ModelEntry(id="g", source="/m.gguf", format="gguf")
    pinned = ModelEntry(id="v", source="/m", engine="vllm")
    engines = [state("tf"), state("llama", engine="llama.cpp"), state("old", max_models=0),
               state("leaving", draining=True), state("vllm", engine="vllm")]
    assert [s.worker for s in loader_candidates(gguf, engines)] == ["llama", "tf"]
    assert [s.worker for s in loader_candidates(pinned, engines)] == ["vllm"]
    assert loader_candidates(ModelEntry(id="a", kind="adapter", base="x"), engines) == []


async def test_concurrent_requests_for_a_cold_model_trigger_one_load_then_run(nc, js, nats_server, start_scheduler,
                                                                              default_model_dir, tmp_path):
    await register(js, "smol-cold", default_model_dir, aliases=["cold-alias"])
    loads: list[str] = []

    async def spy(msg) -> None:
        command = decode_command(msg.data)
        if isinstance(command, LoadModel):
            loads.append(command.model)
    async with real_engine(nats_server.url, default_model_dir, tmp_path) as (service, worker):
        await nc.subscribe(names.engine_control(worker), cb=spy)
        async with start_scheduler() as scheduler, ReplyInbox(nc) as first, ReplyInbox(nc) as second:
            await eventually(lambda: scheduler.table.get(worker) is not None, what="the engine's heartbeat")
            deadline = time.time() + 60
            short = SamplingParams(max_tokens=6, temperature=0.0)
            reqs = [await submit(nc, new_request(model=name, reply_to=inbox.subject, deadline=deadline,
                                                 sampling=short))
                    for name, inbox in (("smol-cold", first), ("cold-alias", second))]
            for inbox in (first, second):
                await eventually(lambda inbox=inbox: any(isinstance(e, StreamEnd) for e in inbox.events), 60,
                                 "the cold-started request to finish")
                start = next(e for e in inbox.events if isinstance(e, StreamStart))
                assert start.model == "smol-cold" and start.worker == worker
            assert {r.id for r in reqs} == {e.id for e in first.events + second.events}
            assert loads == ["smol-cold"], "two requests for one cold model must trigger exactly one load"
            assert sorted(m.id for m in service.host.served_models()) == sorted([DEFAULT_MODEL_ID, "smol-cold"])

            async with ReplyInbox(nc) as unknown:
                await submit(nc, new_request(model="nowhere-at-all", reply_to=unknown.subject))
                error = await unknown.error()
                assert error.code == ErrorCode.MODEL_NOT_FOUND and "registry" in error.message


async def test_a_registered_model_that_fails_to_load_is_a_typed_error(nc, js, nats_server, start_scheduler,
                                                                     default_model_dir, tmp_path):
    await register(js, "cold-missing", tmp_path / "no-such-dir")
    async with real_engine(nats_server.url, default_model_dir, tmp_path) as (service, worker):
        async with start_scheduler() as scheduler, ReplyInbox(nc) as inbox:
            await eventually(lambda: scheduler.table.get(worker) is not None, what="the engine's heartbeat")
            await submit(nc, new_request(model="cold-missing", reply_to=inbox.subject))
            error = await inbox.error(timeout=30)
            assert error.code == ErrorCode.MODEL_NOT_FOUND and "no-such-dir" in error.message
            await asyncio.sleep(0)


async def test_a_fully_fine_tuned_model_in_the_object_store_cold_starts(nc, js, nats_server, start_scheduler,
                                                                        default_model_dir, tmp_path):
    # What the trainer publishes for method "full": a tar of the model directory under models/<id>
    # and a base-model registry entry whose source is that artifact.
    model_id = "smol-full-ft"
    store = await js.object_store(names.ARTIFACTS_STORE)
    await store.put(artifacts.model_object(model_id), artifacts.pack_dir(default_model_dir))
    await register(js, model_id, f"artifact:{artifacts.model_object(model_id)}", kind=BASE, format="safetensors",
                   method="full", context_length=2048)
    async with real_engine(nats_server.url, default_model_dir, tmp_path) as (service, worker):
        async with start_scheduler() as scheduler, ReplyInbox(nc) as inbox:
            await eventually(lambda: scheduler.table.get(worker) is not None, what="the engine's heartbeat")
            await submit(nc, new_request(model=model_id, reply_to=inbox.subject, deadline=time.time() + 90,
                                         sampling=SamplingParams(max_tokens=6, temperature=0.0)))
            await eventually(lambda: any(isinstance(e, (StreamEnd, StreamError)) for e in inbox.events), 90,
                             "the cold-started full model to answer")
            assert not [e for e in inbox.events if isinstance(e, StreamError)], inbox.events
            start = next(e for e in inbox.events if isinstance(e, StreamStart))
            assert (start.model, start.worker) == (model_id, worker)
            served = {m.id: m for m in service.host.served_models()}
            assert served[model_id].context_length == 2048
            # Downloaded once into the engine's model store, where a restart finds it.
            assert (model_dir(tmp_path, names.slug(model_id)) / "config.json").exists()
