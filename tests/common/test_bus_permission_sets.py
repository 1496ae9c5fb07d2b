"""The permission sets themselves (pure): inbox isolation, no stream admin, per-worker engines."""

from __future__ import annotations

import pytest

from schemas import names
from services.common import bus_permissions
from services.common.bus_permissions import Permissions

ALL = bus_permissions.identities(["w1", "w2"])
STREAM_ADMIN = ("STREAM.CREATE", "STREAM.UPDATE", "STREAM.DELETE", "CONSUMER.DURABLE.CREATE", "$JS.API.>")


@pytest.mark.parametrize("perms", ALL.values(), ids=list(ALL))
def test_each_identity_subscribes_only_to_its_own_inbox(perms: Permissions):
    inboxes = [s for s in perms.subscribe if s.startswith(names.REPLY_PREFIX)]
    assert inboxes == [f"{perms.inbox}.>"]
    assert len({p.inbox for p in ALL.values()}) == len(ALL)  # nobody shares an inbox root


@pytest.mark.parametrize("perms", [p for p in ALL.values() if p.identity != "operator"],
                         ids=[i for i in ALL if i != "operator"])
def test_only_the_operator_administers_jetstream(perms: Permissions):
    assert not [s for s in perms.publish if any(admin in s for admin in STREAM_ADMIN)]
    # Purges only of content an identity may already write and delete: the artifacts store's chunks
    # (a replaced object), and the batches bucket's line outcomes (a finished batch's, by the edge).
    own = {f"$JS.API.STREAM.PURGE.{names.obj_stream(names.ARTIFACTS_STORE)}",
           f"$JS.API.STREAM.PURGE.{names.kv_stream(names.BATCHES_BUCKET)}"}
    assert not [s for s in perms.publish if s.startswith("$JS.API.STREAM.PURGE.") and s not in own]


def test_an_engine_addresses_only_its_own_subjects():
    engine = ALL["engine.w1"]
    assert not [s for s in (*engine.publish, *engine.subscribe) if "w2" in s]
    assert not [s for s in engine.subscribe if ".*." in s or s.endswith(".*")]  # no wildcard over workers
    assert names.kv_key_subject(names.WORKERS_BUCKET, "w1") in engine.publish
    assert names.kv_subjects(names.WORKERS_BUCKET) not in engine.publish


def test_only_the_edge_and_the_scheduler_read_api_keys():
    stream = names.kv_stream(names.API_KEYS_BUCKET)
    readers = {p.identity for p in ALL.values() if f"$JS.API.STREAM.INFO.{stream}" in p.publish}
    assert readers == {"edge", "scheduler"}  # and the operator, through $JS.API.>; the scheduler for keyed limits


def test_who_may_submit_work():
    infer = {p.identity for p in ALL.values() if names.infer_submit("high") in p.publish}
    train = {p.identity for p in ALL.values() if names.TRAIN_SUBMIT in p.publish}
    # The scheduler moves keyed requests its admission let through into the queue.
    assert infer == {"edge", "producer", "scheduler"} and train == {"edge"}


def test_a_key_producer_submits_only_under_its_own_key_id():
    perms = bus_permissions.key_producer("k1", ["inference"])
    assert {s for s in perms.publish if ".infer." in s} == {
        *(names.infer_keyed("k1", lane) for lane in names.LANES_BY_PRIORITY), names.INFER_CANCEL}
    assert not bus_permissions.key_producer("k2", ["training"]).publish


def test_server_config_map():
    config = ALL["edge"].as_config()
    assert config["allow_responses"] is True
    assert config["subscribe"]["allow"][0] == "_INBOX.edge.>"
    assert "allow_responses" not in ALL["producer"].as_config()
