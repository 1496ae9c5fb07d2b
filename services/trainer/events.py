"""A job's events on ``llm.v1.train.job.<id>.event`` (stream ``LLM_TRAIN_EVENTS``)."""

from __future__ import annotations

import logging
import time
import uuid

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from schemas import names
from schemas.training import TrainEvent
from services.common import js_publish

log = logging.getLogger(__name__)
_ENCODER = msgspec.json.Encoder()
# How long an event publish caught in a NATS leader election is retried.
_PUBLISH_WINDOW = 20.0


class EventLog:
    """Publishes job events with JetStream acks (they serve ``/events`` and live progress)."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js

    async def emit(self, job_id: str, message: str, *, type: str = "message", level: str = "info",
                   data: dict | None = None) -> TrainEvent:
        """Publish one event; a failure is logged, never raised (the job state stays authoritative)."""
        event = TrainEvent(id=f"ftevent-{uuid.uuid4().hex[:24]}", job_id=job_id, created_at=time.time(),
                           level=level, type=type, message=message, data=data or {})
        try:
            # Retried through a leader election with the same Nats-Msg-Id: stored once.
            await js_publish.publish(self.js, names.train_job_events(job_id), _ENCODER.encode(event),
                                     msg_id=event.id, timeout=5.0, window=_PUBLISH_WINDOW)
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            log.warning("job %s: event %r not published: %s", job_id, message, exc)
        return event
