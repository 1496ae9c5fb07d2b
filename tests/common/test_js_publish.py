"""services.common.js_publish: a publish caught in a leader election is retried and stored once."""

from __future__ import annotations

import asyncio
import uuid

import nats
import nats.js.errors
import pytest

from schemas import names
from services.common import js_publish
from tests.cluster_support import bare_nats_cluster, nats_cluster, stream_leader  # noqa: F401 (fixtures)


async def test_a_publish_during_the_queue_leaders_election_is_stored_once(nats_cluster):
    nc = await nats.connect(nats_cluster.urls)
    try:
        js = nc.jetstream()
        leader = await stream_leader(js, names.TRAIN_EVENTS_STREAM)
        # The client must not be on the node about to die (that is the reconnect case, not this one).
        await nc.close()
        nc = await nats.connect([u for u, n in zip(nats_cluster.urls, nats_cluster.server_names) if n != leader],
                                dont_randomize=True)
        js = nc.jetstream()
        subject = names.train_job_events(f"job-{uuid.uuid4().hex[:8]}")
        nats_cluster.node_named(leader).kill()
        published = await js_publish.publish(js, subject, b"{}", msg_id=f"m-{uuid.uuid4().hex}", timeout=2.0,
                                             window=60.0)

        assert published.ours
        assert published.attempts > 1  # the first attempts met a leaderless stream
        assert await stream_leader(js, names.TRAIN_EVENTS_STREAM) != leader
        info = await js.stream_info(names.TRAIN_EVENTS_STREAM, subjects_filter=subject)
        assert info.state.subjects == {subject: 1}
    finally:
        await nc.close()


async def test_a_retried_publish_whose_first_copy_was_stored_is_ours(nc, js):
    subject, msg_id = names.train_job_events("job-dup"), f"m-{uuid.uuid4().hex}"
    await js.publish(subject, b"{}", headers={"Nats-Msg-Id": msg_id})  # an earlier attempt that was stored
    again = await js_publish.publish(js, subject, b"{}", msg_id=msg_id, timeout=2.0, window=2.0)
    assert again.ack.duplicate and again.attempts == 1 and not again.ours  # someone else's copy


async def test_a_missing_stream_is_given_up_after_the_window(nats_server):
    client = await nats.connect(nats_server.url)
    try:
        with pytest.raises(nats.js.errors.NoStreamResponseError):
            await js_publish.publish(client.jetstream(), "nowhere.at.all", b"x", msg_id="m", timeout=0.2, window=1.0)
    finally:
        await client.close()


async def test_a_full_stream_is_an_answer_not_an_election(nc, js):
    from infra import provision

    defs = provision.load_definitions()
    defs["streams"][names.INFER_STREAM]["max_msgs"] = 1
    await provision.apply(js, definitions=defs, update=True)
    await js.publish(names.infer_submit("normal"), b"{}")
    with pytest.raises(nats.js.errors.APIError) as raised:
        await asyncio.wait_for(js_publish.publish(js, names.infer_submit("normal"), b"{}", msg_id="full",
                                                  timeout=1.0, window=30.0), 5)
    assert raised.value.err_code == 10077
