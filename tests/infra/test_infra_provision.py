"""infra/provision.py against a real nats-server: idempotent, strict, and --update only for safe changes."""

from __future__ import annotations

import copy

import nats
import pytest

from infra import provision
from schemas import names


@pytest.fixture
async def raw_js(nats_server):
    """JetStream of a fresh server with nothing provisioned yet."""
    client = await nats.connect(nats_server.url, name="pytest-provision")
    try:
        yield client.jetstream()
    finally:
        await client.close()


def _changed(**changes: dict) -> dict:
    """The real definitions with some fields of some sections replaced (``streams={"X": {...}}``)."""
    defs = copy.deepcopy(provision.load_definitions())
    for section, objects in changes.items():
        for name, fields in objects.items():
            defs[section][name].update(fields)
    return defs


async def test_applying_twice_changes_nothing(raw_js):
    first = await provision.apply(raw_js)
    second = await provision.apply(raw_js)

    defs = provision.load_definitions()
    expected = sum(len(defs.get(s, {})) for s in ("streams", "consumers", "kv", "object_stores"))
    assert len(first) == expected
    assert {a.action for a in first} == {"created"}
    assert [(a.kind, a.name) for a in second] == [(a.kind, a.name) for a in first]
    assert {a.action for a in second} == {"unchanged"}
    info = await raw_js.stream_info(names.INFER_STREAM)
    assert info.config.max_msgs == defs["streams"][names.INFER_STREAM]["max_msgs"]


async def test_a_changed_limit_is_refused_naming_the_field(raw_js):
    await provision.apply(raw_js)
    defs = _changed(streams={names.INFER_STREAM: {"max_msgs": 5}})

    with pytest.raises(provision.ProvisionError, match=r"LLM_INFER.*max_msgs: server has 1000, definition wants 5"):
        await provision.apply(raw_js, definitions=defs)

    info = await raw_js.stream_info(names.INFER_STREAM)
    assert info.config.max_msgs == 1000


async def test_update_applies_a_limit_change(raw_js):
    await provision.apply(raw_js)
    defs = _changed(streams={names.INFER_STREAM: {"max_msgs": 5}}, kv={names.PROMPT_CACHE_BUCKET: {"ttl": 600}})

    actions = await provision.apply(raw_js, definitions=defs, update=True)

    updated = {a.name: a for a in actions if a.action == "updated"}
    assert set(updated) == {names.INFER_STREAM, names.kv_stream(names.PROMPT_CACHE_BUCKET)}
    assert "max_msgs" in updated[names.INFER_STREAM].detail
    assert (await raw_js.stream_info(names.INFER_STREAM)).config.max_msgs == 5
    assert (await raw_js.stream_info(names.kv_stream(names.PROMPT_CACHE_BUCKET))).config.max_age == 600
    again = await provision.apply(raw_js, definitions=defs)
    assert {a.action for a in again} == {"unchanged"}


async def test_update_applies_a_consumer_change(raw_js):
    await provision.apply(raw_js)
    durable = names.scheduler_durable("high")
    defs = _changed(consumers={durable: {"ack_wait": 45}})

    with pytest.raises(provision.ProvisionError, match="ack_wait"):
        await provision.apply(raw_js, definitions=defs)
    await provision.apply(raw_js, definitions=defs, update=True)

    info = await raw_js.consumer_info(names.INFER_STREAM, durable)
    assert info.config.ack_wait == 45


async def test_a_retention_change_is_refused_even_with_update(raw_js):
    await provision.apply(raw_js)
    defs = _changed(streams={names.TRAIN_EVENTS_STREAM: {"retention": "interest"}})

    with pytest.raises(provision.ProvisionError, match="retention") as refused:
        await provision.apply(raw_js, definitions=defs, update=True)

    assert "recreating" in str(refused.value)
    info = await raw_js.stream_info(names.TRAIN_EVENTS_STREAM)
    assert info.config.retention == "limits"


async def test_a_storage_change_is_refused_even_with_update(raw_js):
    await provision.apply(raw_js)
    defs = _changed(kv={names.MODELS_BUCKET: {"storage": "memory"}})

    with pytest.raises(provision.ProvisionError, match="storage"):
        await provision.apply(raw_js, definitions=defs, update=True)


async def test_definitions_that_disagree_with_names_py_are_refused_before_anything_is_created(raw_js):
    defs = _changed(streams={names.INFER_STREAM: {"subjects": ["llm.v1.infer.queue.*"]}})

    with pytest.raises(provision.ProvisionError, match=r"LLM_INFER.*schemas/names.py has \['llm.v1.infer.submit.\*'\]"):
        await provision.apply(raw_js, definitions=defs)

    assert await raw_js.streams_info() == []


async def test_provisioned_objects_carry_the_names_of_names_py(raw_js):
    await provision.apply(raw_js)

    for stream, subjects in names.STREAMS.items():
        assert sorted((await raw_js.stream_info(stream)).config.subjects) == sorted(subjects)
    for durable, (stream, subject) in names.DURABLES.items():
        assert (await raw_js.consumer_info(stream, durable)).config.filter_subject == subject
    for bucket in names.KV_BUCKETS:
        assert (await raw_js.stream_info(names.kv_stream(bucket))).config.subjects == [names.kv_subjects(bucket)]
    for bucket in names.OBJECT_STORES:
        info = await raw_js.stream_info(names.obj_stream(bucket))
        assert sorted(info.config.subjects) == sorted(names.obj_subjects(bucket))
