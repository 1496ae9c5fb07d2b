"""Auth test support — no tests in here: JWT keys and tokens, and an edge config with auth on."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

AUDIENCE = "cy-test"
ISSUER = "https://issuer.test"
HS_SECRET = b"a-shared-secret-of-at-least-32-bytes!!"


@dataclass
class SigningKeys:
    """The private halves the tests sign with, and the files the edge reads the verifying halves from."""

    secret_file: Path
    public_key_file: Path
    private_key: object
    algorithm: str


def make_keys(tmp: Path, algorithm: str = "ES256") -> SigningKeys:
    """An HS256 secret file and an ES256 (or RS256) key pair, the public half as a PEM file."""
    private = ec.generate_private_key(ec.SECP256R1()) if algorithm == "ES256" else \
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
    secret_file, public_file = tmp / "jwt.secret", tmp / f"jwt-{algorithm}.pem"
    secret_file.write_bytes(HS_SECRET + b"\n")
    public_file.write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return SigningKeys(secret_file, public_file, private, algorithm)


def claims(**overrides) -> dict:
    """Valid claims for the test audience and issuer, with the inference scope; ``None`` drops a claim."""
    now = int(time.time())
    out = {"sub": "user-1", "aud": AUDIENCE, "iss": ISSUER, "iat": now, "nbf": now - 5, "exp": now + 300,
           "scope": "inference"}
    out.update(overrides)
    return {k: v for k, v in out.items() if v is not None}


def hs256(secret: bytes = HS_SECRET, **overrides) -> str:
    """An HS256 token signed with ``secret``."""
    return jwt.encode(claims(**overrides), secret, algorithm="HS256")


def signed(keys: SigningKeys, **overrides) -> str:
    """A token signed with the key pair's private half."""
    return jwt.encode(claims(**overrides), keys.private_key, algorithm=keys.algorithm)


def bearer(token: str) -> dict[str, str]:
    """An ``Authorization: Bearer`` header."""
    return {"Authorization": f"Bearer {token}"}
