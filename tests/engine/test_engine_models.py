"""One engine, several models: load/unload/list over the control subjects with the real model on real NATS."""

from __future__ import annotations

import asyncio
import json
import logging

import msgspec

from schemas import names
from schemas.control import ListModels, LoadModel, UnloadModel, decode_reply
from schemas.events import StreamEnd, StreamStart, TokenDelta, encode
from schemas.inference import DispatchReply
from services.common.model_store import DEFAULT_MODEL_ID
from tests.engine_models_harness import chat, control, real_engine, register, until_terminal

log = logging.getLogger(__name__)
MiB = 2**20


async def generate(nc, worker: str, model: str, max_tokens: int = 4) -> list:
    """Dispatch a chat request for ``model`` to ``worker``; its events (it must be accepted)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        msg = await nc.request(names.engine_generate(worker), encode(chat(model, inbox, max_tokens)), timeout=5)
        reply = msgspec.json.decode(msg.data, type=DispatchReply)
        assert reply.accepted, reply
        return await until_terminal(sub)
    finally:
        await sub.unsubscribe()


def ids(reply) -> list[str]:
    return sorted(m.id for m in reply.models)


async def test_load_serve_list_and_unload_returns_the_memory(nc, js, nats_server, default_model_dir, tmp_path):
    await register(js, "smol-copy", default_model_dir, aliases=["copy-alias"])
    async with real_engine(nats_server.url, default_model_dir, tmp_path) as (service, worker):
        before = await control(nc, worker, ListModels())
        assert before.ok and ids(before) == [DEFAULT_MODEL_ID]

        loaded = await control(nc, worker, LoadModel(model="copy-alias"))
        assert loaded.ok and loaded.model == "smol-copy" and loaded.evicted == []
        assert ids(loaded) == sorted([DEFAULT_MODEL_ID, "smol-copy"])
        assert loaded.heartbeat is not None and {m.id for m in loaded.heartbeat.models} == set(ids(loaded))
        copy = next(m for m in loaded.models if m.id == "smol-copy")
        assert copy.aliases == ["copy-alias"] and copy.memory_bytes > 100 * MiB

        events = await generate(nc, worker, "copy-alias")
        assert isinstance(events[0], StreamStart) and events[0].model == "smol-copy"
        assert any(isinstance(e, TokenDelta) for e in events) and isinstance(events[-1], StreamEnd)
        # Weights may be memory-mapped: resident once a forward pass has touched them all.
        serving = await control(nc, worker, ListModels())
        again = await control(nc, worker, LoadModel(model="smol-copy"))  # already served: nothing to do
        assert again.ok and again.load_seconds == 0 and ids(again) == ids(loaded)

        unloaded = await control(nc, worker, UnloadModel(model="smol-copy"))
        assert unloaded.ok and ids(unloaded) == [DEFAULT_MODEL_ID]
        rise = serving.memory_bytes - before.memory_bytes
        drop = serving.memory_bytes - unloaded.memory_bytes
        log.warning("RSS: %.0f MiB before, %.0f MiB with the copy (+%.0f), %.0f MiB after unloading (-%.0f)",
                    before.memory_bytes / MiB, serving.memory_bytes / MiB, rise / MiB, unloaded.memory_bytes / MiB,
                    drop / MiB)
        assert rise > 300 * MiB, "a second fp32 copy of a 135M-parameter model takes over 500 MB"
        assert drop > 0.6 * rise, f"unloading returned only {drop / MiB:.0f} of {rise / MiB:.0f} MiB"
        gone = await generate_refused(nc, worker, "copy-alias")
        assert gone.code == "model_not_found"
        assert isinstance((await generate(nc, worker, "default"))[-1], StreamEnd)


async def generate_refused(nc, worker: str, model: str) -> DispatchReply:
    msg = await nc.request(names.engine_generate(worker), encode(chat(model, nc.new_inbox())), timeout=5)
    reply = msgspec.json.decode(msg.data, type=DispatchReply)
    assert not reply.accepted
    return reply


async def test_least_recently_used_idle_model_is_evicted_at_max_models(nc, js, nats_server, default_model_dir,
                                                                      tmp_path):
    for model_id in ("copy-a", "copy-b"):
        await register(js, model_id, default_model_dir)
    async with real_engine(nats_server.url, default_model_dir, tmp_path, "--max-models", "2") as (service, worker):
        assert (await control(nc, worker, LoadModel(model="copy-a"))).evicted == []
        await generate(nc, worker, DEFAULT_MODEL_ID)  # the default model is now more recently used than copy-a
        loaded = await control(nc, worker, LoadModel(model="copy-b"))
        assert loaded.ok and loaded.evicted == ["copy-a"]
        assert ids(loaded) == sorted([DEFAULT_MODEL_ID, "copy-b"])
        assert (await generate_refused(nc, worker, "copy-a")).code == "model_not_found"
        assert isinstance((await generate(nc, worker, "copy-b"))[-1], StreamEnd)
        assert service.metrics.registry.get_sample_value("llm_engine_models_loaded") == 2


async def test_a_model_with_requests_in_flight_is_never_evicted(nc, js, nats_server, default_model_dir, tmp_path):
    await register(js, "copy-a", default_model_dir)
    async with real_engine(nats_server.url, default_model_dir, tmp_path, "--max-models", "1") as (service, worker):
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        long = chat(DEFAULT_MODEL_ID, inbox, max_tokens=4000)
        long.sampling.stop = []
        msg = await nc.request(names.engine_generate(worker), encode(long), timeout=5)
        assert msgspec.json.decode(msg.data, type=DispatchReply).accepted
        await sub.next_msg(timeout=30)  # started
        refused = await control(nc, worker, LoadModel(model="copy-a"))
        assert not refused.ok and refused.code == "engine_busy" and "in flight" in refused.message
        assert ids(refused) == [DEFAULT_MODEL_ID]
        await nc.publish(names.INFER_CANCEL, json.dumps({"id": long.id}).encode())
        await until_terminal(sub)
        loaded = await control(nc, worker, LoadModel(model="copy-a"))
        assert loaded.ok and loaded.evicted == [DEFAULT_MODEL_ID] and ids(loaded) == ["copy-a"]


async def test_a_failing_load_is_a_typed_error_and_the_engine_keeps_serving(nc, js, nats_server, default_model_dir,
                                                                            tmp_path):
    missing = tmp_path / "no-such-model"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "not-a-real-architecture"}')
    await register(js, "missing", missing)
    await register(js, "broken", broken)
    await register(js, "hub-only", "SomeOrg/not-downloaded-model")
    async with real_engine(nats_server.url, default_model_dir, tmp_path) as (service, worker):
        gone = await control(nc, worker, LoadModel(model="missing"))
        assert not gone.ok and gone.code == "model_not_found" and str(missing) in gone.message
        bad = await control(nc, worker, LoadModel(model="broken"))
        assert not bad.ok and bad.code == "engine_failed" and str(broken) in bad.message and "Error" in bad.message
        hub = await control(nc, worker, LoadModel(model="hub-only"))
        assert not hub.ok and hub.code == "model_not_found" and "not in the local cache" in hub.message
        unknown = await control(nc, worker, LoadModel(model="never-registered"))
        assert not unknown.ok and unknown.code == "model_not_found" and "registry" in unknown.message
        nonsense = decode_reply((await nc.request(names.engine_control(worker), b'{"type": "reboot"}')).data)
        assert not nonsense.ok and nonsense.code == "invalid_request"
        assert ids(await control(nc, worker, ListModels())) == [DEFAULT_MODEL_ID]
        assert isinstance((await generate(nc, worker, DEFAULT_MODEL_ID))[-1], StreamEnd)


async def test_broadcast_list_reaches_every_engine(nc, js, nats_server, default_model_dir, tmp_path):
    async with real_engine(nats_server.url, default_model_dir, tmp_path) as (_, worker):
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish(names.ENGINE_CONTROL_ALL, encode(ListModels()), reply=inbox)
        reply = decode_reply((await sub.next_msg(timeout=5)).data)
        assert reply.ok and reply.worker == worker and ids(reply) == [DEFAULT_MODEL_ID]
        assert reply.heartbeat.max_models == 2 and reply.memory_bytes > 0
        await asyncio.sleep(0)
