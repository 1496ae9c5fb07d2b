"""Binding to provisioned KV buckets that a service can run without."""

from __future__ import annotations

import logging

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)


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
