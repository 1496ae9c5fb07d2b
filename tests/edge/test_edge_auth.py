"""The auth matrix over HTTP: API keys (both headers), JWTs (HS256, ES256, RS256), scopes, revocation."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer

from schemas.auth import Scope
from services.common.api_key_store import ApiKeyStore
from services.edge import EdgeConfig, create_app
from services.edge.auth.key_cache import ApiKeyCache
from services.edge.state import AUTHENTICATOR
from tests.auth_support import AUDIENCE, ISSUER, bearer, hs256, make_keys, signed
from tests.edge_harness import MODEL, assert_error, chat_body, engine  # noqa: F401 - fixtures

CACHE_TTL = 0.5


@pytest.fixture
def keys_material(tmp_path):
    """JWT signing keys (HS256 secret, ES256 pair) and their files."""
    return make_keys(tmp_path, "ES256")


def auth_config(nats_server, keys, **extra) -> EdgeConfig:
    """An edge accepting API keys and JWTs, with a short key cache so revocation is quick to test."""
    return EdgeConfig(nats_url=nats_server.url, liveness_interval=0.1, worker_lost_grace=0.2, request_timeout=10,
                      auth="keys+jwt", auth_cache_ttl=CACHE_TTL, jwt_secret_file=str(keys.secret_file),
                      jwt_public_key_file=str(keys.public_key_file), jwt_algorithms=["HS256", keys.algorithm],
                      jwt_audience=AUDIENCE, jwt_issuer=ISSUER, **extra)


@pytest.fixture
async def store(js):
    """The API key bucket, as ``./cy keys`` uses it."""
    return await ApiKeyStore.bind(js)


@pytest.fixture
async def client(nc, nats_server, keys_material):
    """The edge in-process with ``--auth keys+jwt``."""
    async with TestClient(TestServer(create_app(auth_config(nats_server, keys_material)))) as c:
        yield c


async def _status(client, path: str = "/v1/models", headers: dict | None = None, code: str | None = None) -> int:
    """GET ``path``; the status, after checking a 401/403 body and challenge."""
    resp = await client.get(path, headers=headers or {})
    if resp.status in (401, 403):
        assert_error(await resp.json(), code or ("invalid_api_key" if resp.status == 401 else "insufficient_scope"))
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    return resp.status


async def test_open_endpoints_need_no_credentials(client):
    assert await _status(client, "/healthz") == 200
    assert await _status(client, "/metrics") == 200


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer "}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"x-api-key": ""},
])
async def test_missing_or_malformed_credentials_are_401(client, headers):
    assert await _status(client, headers=headers) == 401
    resp = await client.post("/v1/chat/completions", json=chat_body(), headers=headers)
    assert resp.status == 401 and resp.headers["WWW-Authenticate"] == 'Bearer realm="cy-llm"'


async def test_api_key_works_in_both_headers_and_bad_keys_do_not(client, store):
    _, key = await store.create("alice", [Scope.INFERENCE])
    assert await _status(client, headers=bearer(key)) == 200
    assert await _status(client, headers={"x-api-key": key}) == 200
    assert await _status(client, f"/v1/models/{MODEL}", headers={"x-api-key": key}) == 404  # authorised, unknown
    key_id, secret = key.removeprefix("cy-").split(".")
    wrong_secret = f"cy-{key_id}.{secret[::-1]}"
    for bad in (wrong_secret, "cy-000000000000." + secret, "sk-not-ours", key + "x"):
        assert await _status(client, headers=bearer(bad)) == 401, bad
        assert await _status(client, headers={"x-api-key": bad}) == 401, bad


async def test_api_key_reaches_inference_and_openai_sdk_accepts_it(client, store, engine):
    _, key = await store.create("sdk", [Scope.INFERENCE])
    async with openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=key, max_retries=0,
                                  timeout=10) as sdk:
        call = asyncio.create_task(sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]))
        await engine.serve_one(["ok"])
        assert (await call).choices[0].message.content == "ok"
    async with openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="cy-wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()


async def test_scopes_are_enforced_and_admin_implies_all(client, store):
    _, training = await store.create("trainer", [Scope.TRAINING])
    _, inference = await store.create("user", [Scope.INFERENCE])
    _, admin = await store.create("ops", [Scope.ADMIN])
    assert await _status(client, headers=bearer(training)) == 403
    resp = await client.post("/v1/chat/completions", json=chat_body(), headers=bearer(training))
    assert resp.status == 403
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="cy-llm", error="insufficient_scope"'
    assert await _status(client, headers=bearer(admin)) == 200
    # Management routes need admin, and answer with it.
    for path in ("/v1/system/status", "/v1/cluster/status"):
        assert await _status(client, path, headers=bearer(inference)) == 403
        assert await _status(client, path, headers=bearer(training)) == 403
        assert await _status(client, path, headers=bearer(admin)) == 200
    # Training routes need training (or admin), not inference.
    assert await _status(client, "/v1/fine_tuning/jobs", headers=bearer(inference)) == 403
    assert await _status(client, "/v1/fine_tuning/jobs", headers=bearer(training)) == 200
    assert await _status(client, "/api/v1/training/jobs", headers=bearer(inference)) == 403
    # A custom training script needs admin on top of training.
    script_job = {"baseModel": MODEL, "datasetPath": "/data/train.jsonl", "script": "/data/train.py"}
    resp = await client.post("/api/v1/training/start", json=script_job, headers=bearer(training))
    assert resp.status == 403 and (await resp.json())["error"]["param"] == "script"
    resp = await client.delete(f"/v1/models/{MODEL}", headers=bearer(inference))
    assert resp.status == 403


async def test_a_revoked_key_stops_working_within_the_cache_ttl(client, store):
    # The key cache on a clock the test moves: the TTL is checked by its own arithmetic, not by wall time.
    clock = [1000.0]
    client.app[AUTHENTICATOR].bind_keys(ApiKeyCache(store, CACHE_TTL, clock=lambda: clock[0]))
    record, key = await store.create("leaver", [Scope.INFERENCE])
    assert await _status(client, headers=bearer(key)) == 200  # looked up now, trusted for the TTL
    await store.revoke(record.id)
    clock[0] += CACHE_TTL * 0.9
    assert await _status(client, headers=bearer(key)) == 200  # the documented bound: cached until the TTL
    clock[0] += CACHE_TTL * 0.2
    assert await _status(client, headers=bearer(key)) == 401  # past the TTL: looked up again, revoked
    assert await _status(client, headers={"x-api-key": key}) == 401


async def test_good_jwts_are_accepted(client, keys_material):
    assert await _status(client, headers=bearer(hs256())) == 200
    assert await _status(client, headers=bearer(signed(keys_material))) == 200
    assert await _status(client, headers=bearer(hs256(scope=None, scopes=["inference", "training"]))) == 200
    assert await _status(client, headers=bearer(hs256(scope="admin"))) == 200


def _bad_claims(why: str) -> dict:
    now = int(time.time())
    return {"expired": {"exp": now - 60}, "wrong audience": {"aud": "someone-else"},
            "not yet valid": {"nbf": now + 3600}, "wrong issuer": {"iss": "https://evil.test"},
            "no expiry": {"exp": None}}[why]


@pytest.mark.parametrize("why", ["expired", "wrong audience", "not yet valid", "wrong issuer", "no expiry"])
async def test_invalid_jwts_are_401(client, keys_material, why):
    assert await _status(client, headers=bearer(hs256(**_bad_claims(why)))) == 401
    assert await _status(client, headers=bearer(signed(keys_material, **_bad_claims(why)))) == 401


async def test_forged_jwts_are_401(client, tmp_path):
    assert await _status(client, headers=bearer(hs256(secret=b"another-secret-of-at-least-32-bytes"))) == 401
    unsigned = hs256().rsplit(".", 1)[0] + "."
    assert await _status(client, headers=bearer(unsigned)) == 401
    (tmp_path / "other").mkdir()
    other = make_keys(tmp_path / "other", "ES256")  # right algorithm, key pair the edge does not know
    assert await _status(client, headers=bearer(signed(other))) == 401


async def test_jwt_without_the_scope_is_403(client):
    assert await _status(client, headers=bearer(hs256(scope="training"))) == 403
    assert await _status(client, headers=bearer(hs256(scope=None))) == 403


async def test_rs256_public_key_on_a_jwt_only_edge(nc, nats_server, tmp_path, store):
    keys = make_keys(tmp_path, "RS256")
    config = EdgeConfig(
        nats_url=nats_server.url, auth="jwt", jwt_public_key_file=str(keys.public_key_file),
        jwt_audience=AUDIENCE, jwt_issuer=ISSUER)
    _, api_key = await store.create("not-accepted-here", [Scope.ADMIN])
    async with TestClient(TestServer(create_app(config))) as c:
        assert await _status(c, headers=bearer(signed(keys))) == 200
        assert await _status(c, headers=bearer(signed(keys, aud="nope"))) == 401
        assert await _status(c, headers=bearer(hs256())) == 401  # no secret configured: HS256 is not accepted
        assert await _status(c, headers=bearer(api_key)) == 401
