"""Binding to provisioned KV buckets that a service can run without."""

from __future__ import annotations

import contextlib
import logging
import uuid

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.kv import KV_DEL, KV_MARKER_REASON, KV_OP, KV_PURGE, KeyValue

log = logging.getLogger(__name__)

# Messages per fetch when reading a whole bucket.
_KV_BATCH = 256


async def optional_kv(js: JetStreamContext, bucket: str, without: str) -> KeyValue | None:
    """Bucket ``bucket``, or None when provisioning has not created it (logged with what is lost: ``without``)."""
    try:
        return await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        log.warning("KV bucket %s is missing (run ./cy infra apply): %s", bucket, without)
        return None


async def kv_keys(kv: KeyValue) -> list[str]:
    """The keys of ``kv`` that hold a value or a delete marker (readers skip the latter on ``get``), sorted.

    One ``STREAM.INFO`` request with a subjects filter. nats-py's own ``KeyValue.keys()`` runs a
    watcher that can signal "no more keys" before the entries already delivered to it were
    counted, and then reports an empty bucket (seen in CI: the default model missing from the
    registry right after it was put).
    """
    info = await kv._js.stream_info(kv._stream, subjects_filter=f"{kv._pre}>")
    return sorted(subject[len(kv._pre):] for subject in (info.state.subjects or {}))


async def kv_values(kv: KeyValue, *, timeout: float = 5.0, keys: str = ">") -> dict[str, bytes]:
    """The current value of every key of ``kv`` matching ``keys`` (deleted and purged keys left out), in one pass.

    An ephemeral consumer delivers the last message of each key; the number to read is the
    consumer's ``num_pending`` when it was created, so the pass neither ends early (nats-py's
    ``watchall()`` can signal the end of the initial values before the ones already delivered to
    it, see ``kv_keys``) nor waits for keys put after it began.
    """
    js = kv._js
    info = await js.add_consumer(kv._stream, ConsumerConfig(
        name=f"kv-values-{uuid.uuid4().hex}", filter_subject=f"{kv._pre}{keys}",
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, ack_policy=AckPolicy.NONE, mem_storage=True,
        inactive_threshold=60.0))
    values: dict[str, bytes] = {}
    try:
        psub = await js.pull_subscribe_bind(durable=info.name, stream=kv._stream)
        try:
            left = info.num_pending or 0
            while left > 0:
                try:
                    msgs = await psub.fetch(min(left, _KV_BATCH), timeout=timeout)
                except (TimeoutError, nats.errors.TimeoutError):
                    if (await psub.consumer_info()).num_pending:
                        raise  # the server is slow: no partial listing
                    break  # keys purged since the consumer was created: everything left was read
                for msg in msgs:
                    left -= 1
                    key = msg.subject[len(kv._pre):]
                    headers = msg.headers or {}
                    if headers.get(KV_OP) in (KV_DEL, KV_PURGE) or KV_MARKER_REASON in headers:  # tombstones
                        values.pop(key, None)
                    else:
                        values[key] = msg.data
        finally:
            await psub.unsubscribe()
    finally:
        with contextlib.suppress(nats.errors.Error):
            await js.delete_consumer(kv._stream, info.name)
    return values
