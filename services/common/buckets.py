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
