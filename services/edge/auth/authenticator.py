"""Authentication and scope checks of the edge, as one aiohttp middleware.

Credentials come from ``Authorization: Bearer <token>`` or ``x-api-key: <key>``. A bearer value
shaped like a JWT is verified as one (when JWTs are enabled); anything else is an API key,
found by the id embedded in it and compared by hash in constant time. Failures are
``BusError``s that ``services.edge.errors`` turns into 401/403 OpenAI error bodies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import nats.errors
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from schemas.auth import grants
from schemas.errors import BusError, ErrorCode
from services.common.api_keys import key_id_of, key_matches
from services.edge.auth.key_cache import ApiKeyCache
from services.edge.auth.policy import required_scope
from services.edge.config import EdgeConfig
from services.edge.auth.jwt_tokens import JwtRejected, JwtVerifier, looks_like_jwt


@dataclass(frozen=True)
class Principal:
    """Who is calling: ``kind`` is ``key`` or ``jwt``; ``id`` the key id or the token's ``sub``.

    ``limits`` are the key's own (requests/min, tokens/min, concurrent streams) overriding the
    edge's defaults where not ``None``.
    """

    kind: str
    id: str
    scopes: frozenset[str]
    limits: tuple[int | None, int | None, int | None] = (None, None, None)


PRINCIPAL = web.RequestKey("principal", Principal)
log = logging.getLogger(__name__)

# Optional JWT claims with the caller's own budgets, as an API key record has them (0 = unlimited).
JWT_LIMIT_CLAIMS = ("rate_rpm", "rate_tpm", "rate_streams")


def _denied(message: str) -> BusError:
    return BusError(ErrorCode.INVALID_API_KEY, message)


def presented_credential(request: web.Request) -> str | None:
    """The bearer token or ``x-api-key`` value of ``request``, if any (a malformed header is a 401)."""
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise _denied("the Authorization header must be 'Bearer <API key or JWT>'")
        return value.strip()
    key = request.headers.get("x-api-key")
    return key.strip() if key is not None and key.strip() else None


class Authenticator:
    """Turns a presented credential into a ``Principal``, or raises a 401 ``BusError``."""

    def __init__(self, config: EdgeConfig) -> None:
        """Load the JWT keys now (start-up); API keys need the bus, see ``bind_keys``."""
        self.config = config
        self.jwt = JwtVerifier(config) if config.uses_jwt else None
        self.keys: ApiKeyCache | None = None

    def bind_keys(self, cache: ApiKeyCache) -> None:
        """Start accepting API keys looked up through ``cache``."""
        self.keys = cache

    async def authenticate(self, credential: str) -> Principal:
        """The caller behind ``credential``."""
        if self.jwt is not None and looks_like_jwt(credential):
            try:
                claims = self.jwt.verify(credential)
            except JwtRejected as exc:
                raise _denied(f"invalid token: {exc}") from None
            return Principal("jwt", str(claims.get("sub", "")), frozenset(self.jwt.scopes(claims)),
                             jwt_limits(claims))
        if self.keys is None:
            raise _denied("this server accepts only JWT bearer tokens")
        return await self._api_key(credential)

    async def _api_key(self, key: str) -> Principal:
        key_id = key_id_of(key)
        try:
            record = await self.keys.get(key_id) if key_id is not None and self.keys is not None else None
        except nats.errors.Error as exc:  # JetStream errors derive from it too
            log.warning("API key lookup failed: %s", exc)
            raise BusError(ErrorCode.INTERNAL, "cannot check the API key now: the key store does not answer") from None
        # The hash is compared even for a revoked record, so both failures take the same path.
        if record is None or not key_matches(key, record.hash) or record.revoked:
            raise _denied("incorrect API key provided")
        return Principal("key", record.id, frozenset(record.scopes),
                         (record.rate_rpm, record.rate_tpm, record.rate_streams))


def jwt_limits(claims: dict) -> tuple[int | None, int | None, int | None]:
    """The budgets a verified token grants itself (``rate_rpm``, ``rate_tpm``, ``rate_streams``); an
    absent claim leaves the edge's default, a malformed one is a 401 (the issuer made a mistake)."""
    values = []
    for name in JWT_LIMIT_CLAIMS:
        value = claims.get(name)
        if value is not None and (type(value) is not int or value < 0):
            raise _denied(f"invalid token: claim {name!r} must be a non-negative integer")
        values.append(value)
    return values[0], values[1], values[2]


def auth_middleware(authenticator: Authenticator) -> Middleware:
    """Require a credential with the scope ``auth_policy`` names for the route; open routes pass."""

    @web.middleware
    async def authorize(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Check one request's credential and scope before its handler runs."""
        scope = required_scope(request.method, request.path)
        if scope is None:
            return await handler(request)
        credential = presented_credential(request)
        if credential is None:
            raise _denied("missing credentials: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'")
        principal = await authenticator.authenticate(credential)
        if not grants(principal.scopes, scope):
            raise BusError(ErrorCode.INSUFFICIENT_SCOPE,
                           f"this credential lacks the '{scope}' scope needed for {request.method} {request.path}")
        request[PRINCIPAL] = principal
        return await handler(request)

    return authorize
