"""The one error vocabulary shared by every service.

Codes travel as plain strings (so a newer peer's code still decodes); the edge maps each
code to an HTTP status and an OpenAI error type in exactly one place.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """Typed error codes carried by ``StreamError`` and ``DispatchReply``."""

    INVALID_REQUEST = "invalid_request"
    MODEL_NOT_FOUND = "model_not_found"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    UNSUPPORTED = "unsupported"
    NO_WORKER = "no_worker_available"
    ENGINE_BUSY = "engine_busy"
    ENGINE_FAILED = "engine_failed"
    WORKER_LOST = "worker_lost"
    QUEUE_FULL = "queue_full"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    INTERNAL = "internal_error"
    # Auth, answered by the edge itself: missing/unknown/expired credentials, and a scope the credential lacks.
    INVALID_API_KEY = "invalid_api_key"
    INSUFFICIENT_SCOPE = "insufficient_scope"
    # A per-key budget (requests or tokens per minute, concurrent streams) is spent, on every edge together.
    RATE_LIMITED = "rate_limit_exceeded"
    # Resources the edge manages (uploaded files, fine-tuning jobs).
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"  # the resource's state forbids the change (cancelling a finished job)
    REQUEST_TOO_LARGE = "request_too_large"
    UNAVAILABLE = "unavailable"  # a bus resource the request needs is missing or not answering
    # The client stopped reading its stream: the edge cut the request instead of buffering for it.
    SLOW_CONSUMER = "slow_consumer"


class BusError(Exception):
    """An error with a code from the shared vocabulary, raised inside a service and sent as a typed message."""

    def __init__(self, code: ErrorCode | str, message: str, *, param: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.code = str(code)
        self.message = message
        self.param = param
        # Seconds a client should wait before retrying, when the raiser knows better than the default.
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"BusError({self.code!r}, {self.message!r})"
