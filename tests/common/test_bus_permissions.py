"""Every bus identity against a real nats-server with the generated nkey users.

Table-driven: for each identity, what it must be able to do succeeds, and a sample of what it
must not do is refused by the server with a permissions violation naming the subject. A refused
publish or subscription is observed as the server's ``-ERR`` (nats-py's error callback), never
as a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import nats
import nats.errors
import pytest

from infra import provision
from schemas import names
from services.cli.backup import restore_backup, take_backup
from services.common import bus, bus_auth, bus_permissions
from services.common.api_key_store import ApiKeyStore
from services.common.natsserver import NatsServer
from services.cli.up import NATS_CONFIG

WORKERS = ("w1", "w2")


@dataclass
class Secured:
    """The running server and every identity's seed file."""

    server: NatsServer
    seeds: dict[str, Path]
    tmp: Path


async def _connect(secured: Secured, identity: str, on_violation: Callable[[str], None] | None = None) -> nats.NATS:
    """Connect as ``identity`` (its seed and inbox root); server errors go to ``on_violation``."""
    perms = bus_permissions.identities(WORKERS)[identity]

    async def on_error(exc: Exception) -> None:
        if on_violation is not None:
            on_violation(str(exc))

    return await nats.connect(secured.server.url, nkeys_seed=str(secured.seeds[identity]),
                              inbox_prefix=perms.inbox, error_cb=on_error, allow_reconnect=False)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory):
    """A nats-server whose only users are the generated identities, provisioned by the operator."""
    tmp = tmp_path_factory.mktemp("secured")
    perms = bus_permissions.identities(WORKERS)
    seeds = bus_auth.ensure_seeds(tmp / "nkeys", perms.values())
    config = bus_auth.write_server_config(NATS_CONFIG, tmp / "server.conf", seeds, perms)
    server = NatsServer(tmp / "nats", config=config, log_file=tmp / "nats.log").start()
    secured = Secured(server, seeds, tmp)

    async def provision_as_operator() -> None:
        nc = await _connect(secured, bus_permissions.OPERATOR)
        await provision.apply(nc.jetstream())
        await nc.close()

    try:
        asyncio.run(provision_as_operator())
        yield secured
    finally:
        server.stop()


def test_seed_files_are_private_and_only_public_keys_reach_the_config(secured):
    config = (secured.tmp / "server.conf").read_text()
    for identity, seed in secured.seeds.items():
        assert seed.stat().st_mode & 0o777 == 0o600
        assert seed.read_text().strip() not in config
        assert bus_auth.public_key(seed) in config
    assert (secured.tmp / "server.conf").stat().st_mode & 0o777 == 0o600


Action = Callable[[nats.NATS], Awaitable[object]]


async def _kv_get(nc: nats.NATS, bucket: str, key: str) -> object:
    kv = await nc.jetstream().key_value(bucket)
    with contextlib.suppress(nats.js.errors.KeyNotFoundError):
        return await kv.get(key)
    return None


async def _kv_put(nc: nats.NATS, bucket: str, key: str) -> object:
    return await (await nc.jetstream().key_value(bucket)).put(key, b"x")


async def _sub(nc: nats.NATS, subject: str) -> object:
    sub = await nc.subscribe(subject)
    await bus.flush(nc)
    return sub


async def _object_roundtrip(nc: nats.NATS) -> object:
    store = await nc.jetstream().object_store(names.ARTIFACTS_STORE)
    await store.put("perm-test", b"data" * 100)
    assert (await store.get("perm-test")).data == b"data" * 100
    await store.delete("perm-test")
    return True


async def _api_keys(nc: nats.NATS) -> object:
    return await (await ApiKeyStore.bind(nc.jetstream())).records()


async def _batch_outcome(nc: nats.NATS) -> object:
    """A line's outcome written create-only across its kinds, and the batch's counts read back."""
    js = nc.jetstream()
    await js.publish(names.kv_key_subject(names.BATCHES_BUCKET, names.batch_outcome_key("batch_1", "ok", 0)), b"{}",
                     headers={"Nats-Expected-Last-Subject-Sequence": "0",
                              "Nats-Expected-Last-Subject-Sequence-Subject": names.batch_line_keys("batch_1", 0)})
    info = await js.stream_info(names.kv_stream(names.BATCHES_BUCKET),
                                subjects_filter=names.batch_outcome_keys("batch_1"))
    assert len(info.state.subjects or {}) == 1
    return info


ALLOWED: list[tuple[str, str, Action]] = [
    ("edge", "submit to a lane", lambda nc: nc.jetstream().publish(names.infer_submit("low"), b"{}")),
    ("edge", "read API keys", _api_keys),
    ("edge", "files in the object store", _object_roundtrip),
    ("edge", "queue depth", lambda nc: nc.jetstream().stream_info(names.INFER_STREAM)),
    ("edge", "scheduler consumer info",
     lambda nc: nc.jetstream().consumer_info(names.INFER_STREAM, names.scheduler_durable("high"))),
    ("edge", "its own reply inbox", lambda nc: _sub(nc, names.reply_inbox_all("e1", names.identity_inbox("edge")))),
    ("edge", "heartbeats", lambda nc: _sub(nc, names.WORKER_STATUS_ALL)),
    ("edge", "idempotency record", lambda nc: _kv_put(nc, names.IDEMPOTENCY_BUCKET, "k1")),
    ("edge", "stored response", lambda nc: _kv_put(nc, names.RESPONSES_BUCKET, "resp-1")),
    ("edge", "submit a training job", lambda nc: nc.jetstream().publish(names.TRAIN_SUBMIT, b"{}")),
    ("edge", "rate counter", lambda nc: nc.jetstream().publish(names.rate_counter("alice", "requests", 1), b"",
                                                              headers={"Nats-Incr": "+1"})),
    ("edge", "queue a batch line", lambda nc: nc.jetstream().publish(names.batch_lines("batch_1"), b"{}")),
    ("edge", "record a batch line's outcome once", _batch_outcome),
    ("edge", "take batch work", lambda nc: nc.jetstream().consumer_info(names.BATCH_STREAM, names.BATCH_DURABLE)),
    ("scheduler", "prompt cache lookup", lambda nc: _kv_get(nc, names.PROMPT_CACHE_BUCKET, "abc")),
    ("scheduler", "strategy", lambda nc: _kv_get(nc, names.SCHEDULER_CONFIG_BUCKET, names.STRATEGY_KEY)),
    ("scheduler", "doorbell", lambda nc: _sub(nc, names.INFER_SUBMIT_ALL)),
    ("scheduler", "read API keys (limits of keyed requests)", _api_keys),
    ("scheduler", "keyed admission consumer",
     lambda nc: nc.jetstream().consumer_info(names.INFER_KEYED_STREAM, names.KEYED_DURABLE)),
    ("scheduler", "send a typed error to a reply subject", lambda nc: nc.publish("_INBOX.edge.e1.r1", b"{}")),
    ("engine.w1", "heartbeat", lambda nc: nc.publish(names.worker_status("w1"), b"{}")),
    ("engine.w1", "its worker entry", lambda nc: _kv_put(nc, names.WORKERS_BUCKET, "w1")),
    ("engine.w1", "its generate subject", lambda nc: _sub(nc, names.engine_generate("w1"))),
    ("engine.w1", "model registry", lambda nc: _kv_get(nc, names.MODELS_BUCKET, "m")),
    ("engine.w1", "fill the prompt cache", lambda nc: _kv_put(nc, names.PROMPT_CACHE_BUCKET, "abc")),
    ("trainer", "job state", lambda nc: _kv_put(nc, names.TRAIN_JOBS_BUCKET, "ftjob-1")),
    ("trainer", "register a model", lambda nc: _kv_put(nc, names.MODELS_BUCKET, "ft-model")),
    ("trainer", "checkpoints in the object store", _object_roundtrip),
    ("trainer", "job events", lambda nc: nc.jetstream().publish(names.train_job_events("ftjob-1"), b"{}")),
    ("operator", "create an API key", lambda nc: ApiKeyStore.bind(nc.jetstream())),
    ("operator", "heartbeats", lambda nc: _sub(nc, names.WORKER_STATUS_ALL)),
    ("producer", "submit to a lane", lambda nc: nc.jetstream().publish(names.infer_submit("low"), b"{}")),
    ("producer", "cancel", lambda nc: nc.publish(names.INFER_CANCEL, b"{}")),
]

DENIED: list[tuple[str, str, Action, str]] = [
    ("engine.w1", "submit a training job", lambda nc: nc.jetstream().publish(names.TRAIN_SUBMIT, b"{}"),
     names.TRAIN_SUBMIT),
    ("engine.w1", "read stored responses", lambda nc: _kv_get(nc, names.RESPONSES_BUCKET, "resp-1"),
     f"$JS.API.STREAM.INFO.{names.kv_stream(names.RESPONSES_BUCKET)}"),
    ("engine.w1", "read API keys", _api_keys, f"$JS.API.STREAM.INFO.{names.kv_stream(names.API_KEYS_BUCKET)}"),
    ("engine.w1", "another engine's generate subject", lambda nc: _sub(nc, names.engine_generate("w2")),
     names.engine_generate("w2")),
    ("engine.w1", "another engine's worker entry", lambda nc: _kv_put(nc, names.WORKERS_BUCKET, "w2"),
     names.kv_key_subject(names.WORKERS_BUCKET, "w2")),
    ("engine.w1", "the edge's replies", lambda nc: _sub(nc, "_INBOX.edge.>"), "_INBOX.edge.>"),
    ("edge", "delete the object store", lambda nc: nc.jetstream().delete_object_store(names.ARTIFACTS_STORE),
     f"$JS.API.STREAM.DELETE.{names.obj_stream(names.ARTIFACTS_STORE)}"),
    ("edge", "purge the inference queue", lambda nc: nc.jetstream().purge_stream(names.INFER_STREAM),
     f"$JS.API.STREAM.PURGE.{names.INFER_STREAM}"),
    ("edge", "read every request", lambda nc: _sub(nc, "llm.v1.>"), "llm.v1.>"),
    ("edge", "a consumer on the queue", lambda nc: nc.jetstream().add_consumer(
        names.INFER_STREAM, durable_name="spy", filter_subject=names.infer_submit("high")),
     f"$JS.API.CONSUMER.DURABLE.CREATE.{names.INFER_STREAM}.spy"),
    ("scheduler", "submit a training job", lambda nc: nc.jetstream().publish(names.TRAIN_SUBMIT, b"{}"),
     names.TRAIN_SUBMIT),
    ("scheduler", "delete the queue", lambda nc: nc.jetstream().delete_stream(names.INFER_STREAM),
     f"$JS.API.STREAM.DELETE.{names.INFER_STREAM}"),
    ("trainer", "submit inference", lambda nc: nc.jetstream().publish(names.infer_submit("high"), b"{}"),
     names.infer_submit("high")),
    ("trainer", "read API keys", _api_keys, f"$JS.API.STREAM.INFO.{names.kv_stream(names.API_KEYS_BUCKET)}"),
    ("producer", "read other requests", lambda nc: _sub(nc, names.INFER_SUBMIT_ALL), names.INFER_SUBMIT_ALL),
    ("producer", "read every reply", lambda nc: _sub(nc, "_INBOX.>"), "_INBOX.>"),
    ("producer", "read API keys", _api_keys, f"$JS.API.STREAM.INFO.{names.kv_stream(names.API_KEYS_BUCKET)}"),
    ("producer", "talk to an engine directly", lambda nc: nc.publish(names.engine_generate("w1"), b"{}"),
     names.engine_generate("w1")),
    ("producer", "queue a batch line", lambda nc: nc.publish(names.batch_lines("batch_1"), b"{}"),
     names.batch_lines("batch_1")),
    ("engine.w1", "write a batch's state", lambda nc: nc.publish(
        names.kv_key_subject(names.BATCHES_BUCKET, "batch_1"), b"{}"),
     names.kv_key_subject(names.BATCHES_BUCKET, "batch_1")),
    ("operator", "read requests", lambda nc: _sub(nc, names.INFER_SUBMIT_ALL), names.INFER_SUBMIT_ALL),
    ("operator", "read the edge's replies", lambda nc: _sub(nc, "_INBOX.edge.>"), "_INBOX.edge.>"),
]


@pytest.mark.parametrize(("identity", "what", "action"), ALLOWED, ids=[f"{i}: {w}" for i, w, _ in ALLOWED])
async def test_identity_may(secured, identity, what, action):
    violations: list[str] = []
    nc = await _connect(secured, identity, violations.append)
    try:
        await action(nc)
        await bus.flush(nc)
    finally:
        await nc.close()
    assert violations == []


@pytest.mark.parametrize(("identity", "what", "action", "subject"), DENIED, ids=[f"{i}: {w}" for i, w, _, _ in DENIED])
async def test_identity_may_not(secured, identity, what, action, subject):
    violations: list[str] = []
    refused = asyncio.Event()

    def on_violation(message: str) -> None:
        violations.append(message)
        if f'"{subject}'.lower() in message.lower():  # nats-py lowercases the server's -ERR
            refused.set()

    nc = await _connect(secured, identity, on_violation)
    # The action never completes normally: a refused request gets no answer, so it waits until cancelled.
    attempt = asyncio.ensure_future(action(nc))
    try:
        async with asyncio.timeout(60):  # a hang guard, not a measurement: the -ERR comes at once
            await refused.wait()
    finally:
        attempt.cancel()
        with contextlib.suppress(asyncio.CancelledError, nats.errors.Error):
            await attempt
        await nc.close()
    assert all("permissions violation" in v.lower() for v in violations), violations


async def test_a_request_flows_through_producer_scheduler_and_engine(secured):
    """The real path with real users: producer -> queue -> scheduler -> engine -> producer's inbox."""
    producer = await _connect(secured, "producer")
    scheduler = await _connect(secured, "scheduler")
    engine = await _connect(secured, "engine.w1")
    try:
        inbox = producer.new_inbox()
        replies = await producer.subscribe(inbox)

        async def generate(msg):
            await engine.publish(msg.data.decode(), b"token")  # to the reply subject carried in the body
            await msg.respond(b"accepted")

        await engine.subscribe(names.engine_generate("w1"), cb=generate)
        await bus.flush(engine)
        await producer.jetstream().publish(names.infer_submit("normal"), inbox.encode())
        psub = await scheduler.jetstream().pull_subscribe_bind(durable=names.scheduler_durable("normal"),
                                                               stream=names.INFER_STREAM)
        [msg] = await psub.fetch(1, timeout=10)
        answer = await scheduler.request(names.engine_generate("w1"), msg.data, timeout=10)
        await msg.ack_sync()
        assert answer.data == b"accepted"
        assert (await replies.next_msg(timeout=10)).data == b"token"
    finally:
        for nc in (producer, scheduler, engine):
            await nc.close()


async def test_trainer_takes_a_job_the_edge_submitted(secured):
    edge = await _connect(secured, "edge")
    trainer = await _connect(secured, "trainer")
    try:
        await edge.jetstream().publish(names.TRAIN_SUBMIT, b'{"job": "perm"}', headers={"Nats-Msg-Id": "perm-job"})
        psub = await trainer.jetstream().pull_subscribe_bind(durable=names.TRAIN_DURABLE, stream=names.TRAIN_STREAM)
        msgs = await psub.fetch(10, timeout=10)
        assert b'{"job": "perm"}' in [m.data for m in msgs]
        for m in msgs:
            await m.ack_sync()
    finally:
        await edge.close()
        await trainer.close()


@pytest.mark.parametrize("seed", ["none", "unknown"])
async def test_a_client_without_a_known_nkey_cannot_connect(secured, seed):
    options = {}
    if seed == "unknown":
        options["nkeys_seed"] = str(bus_auth.ensure_seed(secured.tmp / "strangers", "stranger"))
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(secured.server.url, allow_reconnect=False, max_reconnect_attempts=0, **options)


async def test_the_operator_backs_up_and_restores(secured):
    """``./cy backup`` and ``./cy restore`` run as the operator: snapshots and restores pass its permissions."""
    operator = str(secured.seeds["operator"])
    manifest = await take_backup(secured.server.url, secured.tmp / "backup", nkey=operator)
    empty = NatsServer(secured.tmp / "nats-restore", config=secured.tmp / "server.conf",
                       log_file=secured.tmp / "nats-restore.log").start()
    try:
        restored = await restore_backup(empty.url, secured.tmp / "backup", nkey=operator)
    finally:
        empty.stop()
    assert len(restored) == len(manifest["streams"]) > 0
    assert "Violation" not in (secured.tmp / "nats-restore.log").read_text()
