"""What the edge keeps per ``Idempotency-Key`` in KV ``llm_idempotency`` (key: SHA-256 of caller + route + key)."""

from __future__ import annotations

import msgspec

from schemas.events import Usage


class IdempotencyRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One keyed request: ``running`` (until ``deadline``), ``done`` with its response, or ``failed``.

    ``run`` counts publications under the key (a failed run may be retried, and each run has its
    own ``Nats-Msg-Id``); ``body_sha`` is the SHA-256 of the request body, so the key cannot be
    reused for a different request.
    """

    state: str
    request_id: str
    body_sha: str
    deadline: float
    run: int = 0
    created: int = 0
    model: str = ""
    text: str = ""
    finish_reason: str = ""
    usage: Usage | None = None
