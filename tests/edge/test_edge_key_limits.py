"""Per-key rate limits: stored in the key's record, applied by the edge over its defaults, changed
at run time (within the auth cache TTL); and a JWT's own limits from optional claims."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from services.common.api_key_store import ApiKeyStore, KeyLimits, limits_of
from services.edge import create_app
from services.edge.auth.key_cache import ApiKeyCache
from services.edge.state import AUTHENTICATOR
from tests.auth_support import bearer, hs256
from tests.support import frozen_minute
from tests.edge_harness import (  # noqa: F401 - fixtures
    assert_error,
    chat_body,
    edge_config,
    engine,
    wait_until_served,
)

CHAT = "/v1/chat/completions"


async def served(client, engine, headers: dict[str, str]):
    """A chat request the stand-in engine answers."""
    post = asyncio.create_task(client.post(CHAT, json=chat_body(), headers=headers))
    await engine.serve_one(["ok"])
    return await post


async def test_a_keys_own_rpm_overrides_the_default_and_a_change_applies(nc, js, edge_config, engine):
    store = await ApiKeyStore.bind(js)
    limited, limited_key = await store.create("limited", ["inference"], KeyLimits(rpm=2))
    _, default_key = await store.create("default", ["inference"])
    assert limits_of(limited) == KeyLimits(rpm=2)
    config = msgspec.structs.replace(edge_config, auth="keys", auth_cache_ttl=0.2, rate_rpm=5)
    app = create_app(config, registry=CollectorRegistry(), rate_clock=frozen_minute())
    async with TestClient(TestServer(app)) as client:
        await wait_until_served(client)
        # The key cache on a clock the test moves past its TTL (no waiting for it to expire).
        cache_clock = [0.0]
        app[AUTHENTICATOR].bind_keys(ApiKeyCache(store, config.auth_cache_ttl, clock=lambda: cache_clock[0]))
        mine = {"x-api-key": limited_key}
        for remaining in ("1", "0"):
            resp = await served(client, engine, mine)
            assert resp.status == 200
            assert resp.headers["x-ratelimit-limit-requests"] == "2"
            assert resp.headers["x-ratelimit-remaining-requests"] == remaining
        third = await client.post(CHAT, json=chat_body(), headers=mine)
        assert third.status == 429
        body = await third.json()
        assert_error(body, "rate_limit_exceeded")
        assert "2 requests per minute" in body["error"]["message"]
        assert 1 <= int(third.headers["Retry-After"]) <= 60
        assert third.headers["x-ratelimit-limit-requests"] == "2"
        assert third.headers["x-ratelimit-remaining-requests"] == "0"
        assert third.headers["x-ratelimit-reset-requests"].endswith("s")
        # A key without limits of its own gets the edge's default budget (5), unaffected by the other key.
        for _ in range(3):
            resp = await served(client, engine, {"x-api-key": default_key})
            assert resp.status == 200 and resp.headers["x-ratelimit-limit-requests"] == "5"
        # Raise the limited key's budget: edges apply it within their auth cache TTL.
        updated = await store.set_limits(limited.id, lambda cur: KeyLimits(rpm=10, tpm=cur.tpm, streams=1))
        assert limits_of(updated) == KeyLimits(rpm=10, streams=1)
        cache_clock[0] += config.auth_cache_ttl
        resp = await served(client, engine, mine)
        assert resp.status == 200 and resp.headers["x-ratelimit-limit-requests"] == "10"
        # Back to the default: the edge's 5 (this minute already holds 3 of the key's requests).
        await store.set_limits(limited.id, lambda cur: KeyLimits())
        cache_clock[0] += config.auth_cache_ttl
        resp = await served(client, engine, mine)
        assert resp.status == 200 and resp.headers["x-ratelimit-limit-requests"] == "5"
        assert resp.headers["x-ratelimit-remaining-requests"] == "1"


async def test_changing_limits_keeps_a_revocation_and_refuses_negatives(nc, js):
    store = await ApiKeyStore.bind(js)
    record, _ = await store.create("racer", ["inference"])
    await store.revoke(record.id)
    updated = await store.set_limits(record.id, lambda cur: KeyLimits(rpm=1))
    assert updated.revoked and updated.rate_rpm == 1
    with pytest.raises(ValueError):
        KeyLimits(rpm=-1)


async def test_a_jwt_may_carry_its_own_limits(nc, edge_config, engine, tmp_path):
    secret = tmp_path / "jwt.secret"
    secret.write_bytes(b"a-shared-secret-of-at-least-32-bytes!!\n")
    config = msgspec.structs.replace(edge_config, auth="jwt", jwt_secret_file=str(secret), rate_rpm=5)
    app = create_app(config, registry=CollectorRegistry(), rate_clock=frozen_minute())
    async with TestClient(TestServer(app)) as client:
        await wait_until_served(client)
        own = bearer(hs256(sub="tight", aud=None, iss=None, rate_rpm=1))
        resp = await served(client, engine, own)
        assert resp.status == 200 and resp.headers["x-ratelimit-limit-requests"] == "1"
        refused = await client.post(CHAT, json=chat_body(), headers=own)
        assert refused.status == 429 and refused.headers["x-ratelimit-remaining-requests"] == "0"
        plain = await served(client, engine, bearer(hs256(sub="plain", aud=None, iss=None)))
        assert plain.status == 200 and plain.headers["x-ratelimit-limit-requests"] == "5"
        bad = await client.post(CHAT, json=chat_body(),
                                headers=bearer(hs256(sub="bad", aud=None, iss=None, rate_rpm="many")))
        assert bad.status == 401
        assert "rate_rpm" in (await bad.json())["error"]["message"]
