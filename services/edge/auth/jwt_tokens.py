"""Verifying bearer JWTs with PyJWT: signature, ``exp``, ``nbf``, and ``aud``/``iss`` when configured.

HS* tokens are checked with the shared secret, RS*/ES*/PS* tokens with the public key; a
token's ``alg`` must be one of the configured algorithms and have a key of its family, so a
public key is never used as an HMAC secret.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from services.edge.config import HMAC_ALGORITHMS, EdgeConfig

_JWT_SHAPE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*\Z")


def looks_like_jwt(token: str) -> bool:
    """Three dot-separated base64url parts (an API key has one dot)."""
    return bool(_JWT_SHAPE.match(token))


class JwtRejected(Exception):
    """The token is not acceptable; the message says why (safe to show the caller)."""


class JwtVerifier:
    """Checks tokens against the keys, algorithms and claims of the edge's config."""

    def __init__(self, config: EdgeConfig) -> None:
        """Read the key files once, at start-up; a missing or malformed file fails here, not per request."""
        self._secret = Path(config.jwt_secret_file).read_bytes().strip() if config.jwt_secret_file else None
        self._public = (load_pem_public_key(Path(config.jwt_public_key_file).read_bytes())
                        if config.jwt_public_key_file else None)
        default: list[str] = (["HS256"] if self._secret else []) + (["RS256", "ES256"] if self._public else [])
        self.algorithms = list(config.jwt_algorithms) or default
        self.audience = config.jwt_audience
        self.issuer = config.jwt_issuer
        self.scope_claim = config.jwt_scope_claim
        self.leeway = config.jwt_leeway

    def _key_for(self, token: str) -> tuple[str, Any]:
        try:
            alg = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError as exc:
            raise JwtRejected(f"malformed token: {exc}") from None
        if alg not in self.algorithms:
            raise JwtRejected(f"token algorithm {alg!r} is not accepted (accepted: {', '.join(self.algorithms)})")
        key = self._secret if alg in HMAC_ALGORITHMS else self._public
        if key is None:
            raise JwtRejected(f"no key is configured for {alg} tokens")
        return alg, key

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, or ``JwtRejected`` (bad signature, expired, not yet valid, wrong aud/iss)."""
        alg, key = self._key_for(token)
        try:
            return jwt.decode(token, key, algorithms=[alg], audience=self.audience, issuer=self.issuer,
                              leeway=self.leeway,
                              options={"require": ["exp"], "verify_aud": self.audience is not None})
        except jwt.PyJWTError as exc:
            raise JwtRejected(str(exc) or type(exc).__name__) from None

    def scopes(self, claims: dict[str, Any]) -> list[str]:
        """Scopes from the configured claim: a space-separated string or a list (``scopes`` as a fallback)."""
        value = claims.get(self.scope_claim)
        if value is None and self.scope_claim == "scope":
            value = claims.get("scopes")
        if isinstance(value, str):
            return value.split()
        if isinstance(value, list):
            return [v for v in value if isinstance(v, str)]
        return []
