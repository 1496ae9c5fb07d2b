"""CORS for browser clients, for the origins ``--cors-origins`` names (none by default).

A preflight ``OPTIONS`` from an allowed origin is answered here, before authentication (a
browser sends no credentials on it). Every other response to an allowed origin, errors and
SSE streams included, gets ``Access-Control-Allow-Origin`` through ``on_response_prepare``, and
exposes ``Retry-After`` and the ``x-ratelimit-*`` headers to the page's script. A request from
any other origin gets no CORS header at all, so the browser blocks it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

ALLOWED_METHODS = "GET, POST, DELETE, OPTIONS"
ALLOWED_HEADERS = ("authorization", "content-type", "idempotency-key", "x-api-key", "openai-organization",
                   "openai-project")
EXPOSED_HEADERS = ", ".join((
    "Retry-After", "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"))
PREFLIGHT_MAX_AGE = "600"


class CorsPolicy:
    """Which origins may call, and the headers that say so."""

    def __init__(self, origins: Iterable[str]) -> None:
        self.origins = frozenset(origins)
        self.any_origin = "*" in self.origins

    def allows(self, origin: str | None) -> bool:
        """Whether a page from ``origin`` may call this API."""
        return origin is not None and (self.any_origin or origin in self.origins)

    def allow_origin(self, origin: str) -> dict[str, str]:
        """The headers every response to an allowed origin carries."""
        return {"Access-Control-Allow-Origin": "*" if self.any_origin else origin,
                "Access-Control-Expose-Headers": EXPOSED_HEADERS, "Vary": "Origin"}

    def preflight(self, origin: str, requested_headers: str) -> dict[str, str]:
        """The headers of the answer to a preflight request."""
        asked = {h.strip().lower() for h in requested_headers.split(",") if h.strip()}
        return {**self.allow_origin(origin), "Access-Control-Allow-Methods": ALLOWED_METHODS,
                "Access-Control-Allow-Headers": ", ".join(sorted(asked | set(ALLOWED_HEADERS))),
                "Access-Control-Max-Age": PREFLIGHT_MAX_AGE}


def cors_middleware(policy: CorsPolicy) -> Middleware:
    """Answer preflight requests of allowed origins with 204; leave everything else to the app."""

    @web.middleware
    async def preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
        """One request: a preflight of an allowed origin ends here."""
        origin = request.headers.get(hdrs.ORIGIN)
        if (request.method == hdrs.METH_OPTIONS and policy.allows(origin)
                and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers):
            headers = policy.preflight(origin, request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS, ""))
            return web.Response(status=204, headers=headers)
        return await handler(request)

    return preflight


def cors_headers(policy: CorsPolicy) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """An ``on_response_prepare`` hook adding the allow-origin headers to responses to allowed origins."""

    async def add(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get(hdrs.ORIGIN)
        if policy.allows(origin) and hdrs.ACCESS_CONTROL_ALLOW_ORIGIN not in response.headers:
            response.headers.update(policy.allow_origin(origin))

    return add
