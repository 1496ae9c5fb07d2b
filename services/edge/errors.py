"""The one place where error codes become HTTP statuses and OpenAI error bodies.

Every failure the edge reports — a validation error, a typed ``StreamError`` from an engine,
a full queue, an unknown route — goes through this module, so a code always means the same
status and body wherever it came from.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
from aiohttp import web

from schemas.errors import BusError, ErrorCode

# code -> (HTTP status, OpenAI error ``type``)
_STATUS_AND_TYPE: dict[str, tuple[int, str]] = {
    ErrorCode.INVALID_REQUEST: (400, "invalid_request_error"),
    ErrorCode.UNSUPPORTED: (400, "invalid_request_error"),
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: (400, "invalid_request_error"),
    ErrorCode.MODEL_NOT_FOUND: (404, "invalid_request_error"),
    ErrorCode.QUEUE_FULL: (429, "rate_limit_error"),
    ErrorCode.NO_WORKER: (503, "server_error"),
    ErrorCode.ENGINE_BUSY: (503, "server_error"),
    ErrorCode.ENGINE_FAILED: (502, "server_error"),
    ErrorCode.WORKER_LOST: (502, "server_error"),
    ErrorCode.TIMEOUT: (504, "timeout_error"),
    ErrorCode.CANCELLED: (499, "cancelled"),
    ErrorCode.INTERNAL: (500, "server_error"),
    ErrorCode.INVALID_API_KEY: (401, "authentication_error"),
    ErrorCode.INSUFFICIENT_SCOPE: (403, "permission_error"),
    ErrorCode.RATE_LIMITED: (429, "rate_limit_error"),
    ErrorCode.NOT_FOUND: (404, "invalid_request_error"),
    ErrorCode.CONFLICT: (409, "invalid_request_error"),
    ErrorCode.REQUEST_TOO_LARGE: (413, "invalid_request_error"),
    ErrorCode.UNAVAILABLE: (503, "server_error"),
    ErrorCode.SLOW_CONSUMER: (408, "timeout_error"),  # only ever sent after the first byte, as an SSE event
}
_RETRYABLE_STATUSES = frozenset({429, 503})
# RFC 6750: a 401 names the scheme to use; a 403 for a missing scope says so.
_CHALLENGES = {401: 'Bearer realm="cy-llm"', 403: 'Bearer realm="cy-llm", error="insufficient_scope"'}
# A code this edge does not know (a newer peer's) is still reported, as a server error.
_UNKNOWN = (500, "server_error")

# Plain HTTP failures that never were bus errors (routing, body size, header size): status -> code.
HEADERS_TOO_LARGE = "headers_too_large"
METHOD_NOT_ALLOWED = "method_not_allowed"
_HTTP_CODES: dict[int, str] = {
    404: "not_found",
    405: METHOD_NOT_ALLOWED,
    413: "request_too_large",
    431: HEADERS_TOO_LARGE,
}

# Refusals by the edge itself (the ``reason`` of ``llm_edge_rejected_requests_total``); codes not here
# (an engine that failed, a lost worker, an internal error, a cancel) are failures, not refusals.
_REJECTION_REASONS: dict[str, str] = {
    ErrorCode.INVALID_API_KEY: "auth",
    ErrorCode.INSUFFICIENT_SCOPE: "scope",
    ErrorCode.RATE_LIMITED: "rate_limit",
    ErrorCode.QUEUE_FULL: "queue_full",
    ErrorCode.REQUEST_TOO_LARGE: "body_too_large",
    HEADERS_TOO_LARGE: "headers_too_large",
    ErrorCode.INVALID_REQUEST: "bad_request",
    ErrorCode.UNSUPPORTED: "bad_request",
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: "bad_request",
    ErrorCode.MODEL_NOT_FOUND: "not_found",
    ErrorCode.NOT_FOUND: "not_found",
    METHOD_NOT_ALLOWED: "method_not_allowed",
    ErrorCode.CONFLICT: "conflict",
    ErrorCode.TIMEOUT: "timeout",
    ErrorCode.NO_WORKER: "unavailable",
    ErrorCode.ENGINE_BUSY: "unavailable",
    ErrorCode.UNAVAILABLE: "unavailable",
}

_encoder = msgspec.json.Encoder()


class ErrorDetail(msgspec.Struct):
    """The ``error`` member of an OpenAI error body."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct):
    """An OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


def rejection_reason(code: str) -> str | None:
    """The ``reason`` label a refusal with ``code`` is counted under, or ``None`` when it is no refusal."""
    return _REJECTION_REASONS.get(code)


def http_error_code(status: int) -> str:
    """The error code of a plain HTTP failure (no bus error behind it) with ``status``."""
    return _HTTP_CODES.get(status, "invalid_request" if status < 500 else "internal_error")


def status_for(code: str) -> int:
    """The HTTP status for an error code (500 for codes this edge does not know)."""
    return _STATUS_AND_TYPE.get(code, _UNKNOWN)[0]


def error_body(code: str, message: str, param: str | None = None) -> ErrorBody:
    """The OpenAI error body for an error code."""
    return ErrorBody(ErrorDetail(message=message, type=_STATUS_AND_TYPE.get(code, _UNKNOWN)[1],
                                 param=param, code=code))


def error_json(err: BusError) -> bytes:
    """The JSON bytes of the OpenAI error body for ``err``."""
    return _encoder.encode(error_body(err.code, err.message, err.param))


def error_response(err: BusError, *, retry_after: int | None = None,
                   headers: Mapping[str, str] | None = None) -> web.Response:
    """A complete JSON error response for ``err``, with its mapped status.

    ``Retry-After`` is added to 429 and 503 answers (a full queue, no engine, the edge draining),
    the ones a client should retry; ``WWW-Authenticate`` to 401 and 403 answers.
    """
    status = status_for(err.code)
    out = dict(headers) if headers else {}
    if status in _CHALLENGES:
        out["WWW-Authenticate"] = _CHALLENGES[status]
    retry_after = err.retry_after if err.retry_after is not None else retry_after
    if retry_after is not None and status in _RETRYABLE_STATUSES:
        out["Retry-After"] = str(retry_after)
    return web.Response(status=status, body=error_json(err), content_type="application/json", headers=out)


def http_error_response(exc: web.HTTPException, method: str, path: str) -> web.Response:
    """An aiohttp HTTP error (unknown route, wrong method, body too large) as an OpenAI error body."""
    status = exc.status
    code = http_error_code(status)
    allow = exc.headers.get("Allow")
    if status == 404:
        message = (f"unknown route {method} {path}; the API serves /v1/chat/completions, /v1/completions, "
                   "/v1/models, /healthz and /metrics")
    elif status == 405:
        message = f"{method} is not allowed on {path} (allowed: {allow or 'none'})"
    else:
        message = exc.text or exc.reason
    return plain_error_response(status, code, message, headers={"Allow": allow} if allow else None)


def plain_error_response(status: int, code: str, message: str,
                         headers: Mapping[str, str] | None = None) -> web.Response:
    """An OpenAI error body for a failure that never was a bus error (routing, sizes, a malformed request)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = _encoder.encode(ErrorBody(ErrorDetail(message=message, type=kind, param=None, code=code)))
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)
