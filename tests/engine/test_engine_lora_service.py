"""An adapter published by the trainer (object store + registry) served on demand by the engine on the bus."""

from __future__ import annotations

import uuid

import msgspec
import pytest

from schemas import names
from schemas.errors import ErrorCode
from schemas.events import StreamEnd, StreamError, TokenDelta
from schemas.heartbeat import EngineHeartbeat
from schemas.registry import ADAPTER, ModelEntry
from services.common import artifacts
from tests.lora_support import make_adapter
from tests.engine.test_engine_service import dispatch, events_until_terminal, request, serving

pytestmark = pytest.mark.slow

BASE = "SmolLM2-135M-Instruct"


def engine_service(nats_url: str, engine: str, model_dir, cache_dir):
    # llama.cpp serves the GGUF shipped for the default model; transformers its safetensors copy.
    model = ["--model-path", str(model_dir)] if engine == "transformers" else []
    # Heartbeats every 2 s: an engine gives its requests up after three silent intervals, and this
    # engine runs in the test process, which a loaded CI host has held up for 1.5 s here (a 0.5 s
    # interval then ended the adapter's stream with engine_failed).
    return serving(["--nats-url", nats_url, "--engine", engine, "--model-id", BASE, *model,
                    "--heartbeat-interval", "2", "--adapter-cache-dir", str(cache_dir), "--slots", "4"])


async def generated(nc, worker: str, adapter: str | None) -> list[int]:
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    req = msgspec.structs.replace(request(inbox, max_tokens=12, model=BASE, temperature=0.0), adapter=adapter)
    reply = await dispatch(nc, worker, req)
    assert reply.accepted
    events = await events_until_terminal(sub, timeout=60)
    await sub.unsubscribe()
    assert isinstance(events[-1], StreamEnd), events[-1]
    return [t for e in events if isinstance(e, TokenDelta) for t in e.token_ids]


@pytest.mark.parametrize("engine", ["transformers", "llamacpp"])
async def test_adapter_is_fetched_from_the_object_store_and_served(nc, js, nats_server, default_model_dir,
                                                                  tmp_path, engine):
    if engine == "llamacpp":
        pytest.importorskip("llama_cpp", reason="the llama.cpp engine needs the [llamacpp] extra")
    adapter_id = f"ft-bot-{uuid.uuid4().hex[:6]}"
    src = make_adapter(default_model_dir, tmp_path / "src", "lora", 11)
    store = await js.object_store(names.ARTIFACTS_STORE)
    await store.put(artifacts.adapter_object(adapter_id), artifacts.pack_dir(src))
    registry = await js.key_value(names.MODELS_BUCKET)
    entry = ModelEntry(id=adapter_id, kind=ADAPTER, base=BASE, format="peft", method="lora",
                       source=f"artifact:{artifacts.adapter_object(adapter_id)}")
    await registry.put(names.slug(adapter_id), msgspec.json.encode(entry))
    status = await nc.subscribe(names.WORKER_STATUS_ALL)

    async with engine_service(nats_server.url, engine, default_model_dir, tmp_path / "cache") as (service, worker):
        base = await generated(nc, worker, None)
        tuned = await generated(nc, worker, adapter_id)
        assert tuned != base
        assert (tmp_path / "cache" / names.slug(adapter_id) / "adapter_config.json").is_file()
        # The heartbeat advertises the loaded adapter without waiting for the periodic one.
        for _ in range(50):
            hb = msgspec.json.decode((await status.next_msg(timeout=5)).data, type=EngineHeartbeat)
            if hb.worker == worker and adapter_id in hb.adapters:
                break
        else:
            pytest.fail("no heartbeat listed the adapter")
        assert service.metrics.adapter_loads._value.get() == 1
        assert service.metrics.adapters_loaded._value.get() == 1

        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        # Unknown adapter: the dispatch itself is refused with a typed error, no stream, no hang.
        unknown = msgspec.structs.replace(request(inbox, model=BASE), adapter="ft-nobody-000")
        reply = await dispatch(nc, worker, unknown)
        assert not reply.accepted and reply.code == ErrorCode.MODEL_NOT_FOUND and "ft-nobody-000" in reply.message
        # A registered adapter whose artifact is gone ends its stream with a typed error.
        gone = f"ft-gone-{uuid.uuid4().hex[:6]}"
        await registry.put(names.slug(gone), msgspec.json.encode(
            ModelEntry(id=gone, kind=ADAPTER, base=BASE, source=f"artifact:{artifacts.adapter_object(gone)}")))
        req = msgspec.structs.replace(request(inbox, model=BASE), adapter=gone)
        assert (await dispatch(nc, worker, req)).accepted
        events = await events_until_terminal(sub, timeout=30)
        assert isinstance(events[-1], StreamError) and events[-1].code == ErrorCode.MODEL_NOT_FOUND
        if engine == "llamacpp":  # a registered method llama.cpp cannot apply is refused before the dispatch
            dora = f"ft-dora-{uuid.uuid4().hex[:6]}"
            await registry.put(names.slug(dora), msgspec.json.encode(ModelEntry(
                id=dora, kind=ADAPTER, base=BASE, method="dora", source=f"artifact:{artifacts.adapter_object(dora)}")))
            reply = await dispatch(nc, worker, msgspec.structs.replace(request(inbox, model=BASE), adapter=dora))
            assert not reply.accepted and reply.code == ErrorCode.UNSUPPORTED and "DORA" in reply.message
        # The base model is still served as before.
        assert await generated(nc, worker, None) == base
