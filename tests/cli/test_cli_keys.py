"""``./cy keys`` as a subprocess against a real NATS, and the keys it makes at a real edge."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from schemas import names
from services.common.api_keys import hash_key
from services.edge import EdgeConfig, create_app
from tests.edge_harness import MODEL, BusEngine, wait_until_served
from tests.support import frozen_minute

REPO = Path(__file__).resolve().parents[2]
KEY_RE = re.compile(r"^cy-[0-9a-f]{12}\.[A-Za-z0-9_-]{40,}$", re.M)


async def cy(*args: str) -> tuple[int, str, str]:
    """Run ``python -m services.cli ARGS``; exit status, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "services.cli", *args, cwd=REPO,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


async def create_key(url: str, name: str, *scopes: str) -> str:
    """``./cy keys create``; the printed key."""
    rc, out, err = await cy("keys", "create", "--name", name, *[a for s in scopes for a in ("--scope", s)],
                            "--nats-url", url)
    assert rc == 0, err
    found = KEY_RE.findall(out)
    assert len(found) == 1, out
    return found[0]


async def test_create_stores_only_a_hash_and_list_never_prints_keys(nats_server, js):
    key = await create_key(nats_server.url, "alice", "inference", "training")
    key_id = key[3:15]
    kv = await js.key_value(names.API_KEYS_BUCKET)
    stored = (await kv.get(key_id)).value
    assert key.encode() not in stored and key.split(".")[1].encode() not in stored
    assert hash_key(key).encode() in stored

    rc, out, err = await cy("keys", "list", "--nats-url", nats_server.url)
    assert rc == 0, err
    assert key.split(".")[1] not in out and hash_key(key) not in out and not KEY_RE.search(out)
    row = next(line for line in out.splitlines() if line.startswith(key_id))
    assert row.split()[1:3] == ["alice", "inference,training"] and row.split()[-1] == "no"


async def test_revoke_marks_the_key_and_the_edge_refuses_it(nats_server, nc):
    key = await create_key(nats_server.url, "bob", "inference")
    key_id = key[3:15]
    # No key cache (TTL 0): every request reads the key's record, so the revocation shows on the next one.
    config = EdgeConfig(nats_url=nats_server.url, auth="keys", auth_cache_ttl=0)
    async with TestClient(TestServer(create_app(config))) as client:
        assert (await client.get("/v1/models", headers={"x-api-key": key})).status == 200
        rc, out, err = await cy("keys", "revoke", key_id, "--nats-url", nats_server.url)
        assert rc == 0, err
        assert f"revoked key {key_id}" in out
        assert (await client.get("/v1/models", headers={"x-api-key": key})).status == 401
    rc, out, _ = await cy("keys", "list", "--nats-url", nats_server.url)
    assert next(line for line in out.splitlines() if line.startswith(key_id)).split()[-1] != "no"


async def test_keys_usage_errors(nats_server, nc):
    rc, _, err = await cy("keys", "create", "--name", "x", "--scope", "root", "--nats-url", nats_server.url)
    assert rc == 2 and "invalid choice: 'root'" in err
    rc, _, err = await cy("keys", "revoke", "0123456789ab", "--nats-url", nats_server.url)
    assert rc == 1 and "no API key with id '0123456789ab'" in err
    rc, _, err = await cy("keys", "revoke", "not-an-id", "--nats-url", nats_server.url)
    assert rc == 1 and "not a key id" in err


async def test_keys_without_provisioning_says_to_run_infra_apply(nats_server):
    rc, _, err = await cy("keys", "list", "--nats-url", nats_server.url)
    assert rc == 1 and "./cy infra apply" in err


async def test_create_with_limits_list_shows_them_and_limits_changes_them(nats_server, nc):
    rc, out, err = await cy("keys", "create", "--name", "carol", "--scope", "inference", "--rpm", "1",
                            "--max-streams", "0", "--nats-url", nats_server.url)
    assert rc == 0, err
    key = KEY_RE.findall(out)[0]
    key_id = key[3:15]
    assert "rpm=1 tpm=default max-streams=unlimited" in out

    rc, out, err = await cy("keys", "list", "--nats-url", nats_server.url)
    assert rc == 0, err
    header = out.splitlines()[0].split()
    assert header == ["ID", "NAME", "SCOPES", "RPM", "TPM", "STREAMS", "CREATED", "REVOKED"]
    row = next(line for line in out.splitlines() if line.startswith(key_id)).split()
    assert row[3:6] == ["1", "default", "unlimited"]

    # No key cache (TTL 0): a limits change shows on the next request. Budgets on a clock stopped in one minute.
    config = EdgeConfig(nats_url=nats_server.url, auth="keys", auth_cache_ttl=0)
    engine = await BusEngine(nc, nc.jetstream()).start()
    try:
        async with TestClient(TestServer(create_app(config, rate_clock=frozen_minute()))) as client:
            await wait_until_served(client)
            post = asyncio.create_task(client.post("/v1/completions", json={"model": MODEL, "prompt": "p"},
                                                   headers={"x-api-key": key}))
            await engine.serve_one(["ok"])
            first = await post
            assert first.status == 200 and first.headers["x-ratelimit-limit-requests"] == "1"
            second = await client.post("/v1/completions", json={"model": MODEL, "prompt": "p"},
                                       headers={"x-api-key": key})
            assert second.status == 429 and "Retry-After" in second.headers

            rc, out, err = await cy("keys", "limits", key_id, "--rpm", "0", "--tpm", "500",
                                    "--nats-url", nats_server.url)
            assert rc == 0, err
            assert f"key {key_id} (carol): rpm=unlimited tpm=500 max-streams=unlimited" in out
            post = asyncio.create_task(client.post("/v1/completions", json={"model": MODEL, "prompt": "p"},
                                                   headers={"x-api-key": key}))
            await engine.serve_one(["ok"])
            third = await post
            assert third.status == 200
            assert "x-ratelimit-limit-requests" not in third.headers
            assert third.headers["x-ratelimit-limit-tokens"] == "500"
    finally:
        await engine.stop_heartbeats()

    rc, out, err = await cy("keys", "limits", key_id, "--tpm", "default", "--nats-url", nats_server.url)
    assert rc == 0 and "rpm=unlimited tpm=default max-streams=unlimited" in out, err
    rc, out, err = await cy("keys", "limits", key_id, "--nats-url", nats_server.url)
    assert rc == 0 and "rpm=unlimited tpm=default" in out and "within" not in out, err


async def test_keys_limits_usage_errors(nats_server, nc):
    rc, _, err = await cy("keys", "create", "--name", "x", "--scope", "inference", "--rpm", "-1",
                          "--nats-url", nats_server.url)
    assert rc == 2 and "negative" in err
    rc, _, err = await cy("keys", "limits", "0123456789ab", "--rpm", "many", "--nats-url", nats_server.url)
    assert rc == 2 and "not a whole number" in err
    rc, _, err = await cy("keys", "limits", "0123456789ab", "--rpm", "3", "--nats-url", nats_server.url)
    assert rc == 1 and "no API key with id '0123456789ab'" in err
