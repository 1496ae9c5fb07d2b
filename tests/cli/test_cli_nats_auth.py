"""``./cy up``'s bus identities: seeds per service, the loopback rule of --nats-auth none, ./cy nats permissions."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import nats
import nats.errors
import pytest

from infra import provision
from schemas import names
from services.cli import keys, nats_auth
from services.cli.banner import ready_banner
from services.cli.errors import CliError
from services.cli.up import UpOptions, child_specs, worker_id
from services.common import bus_auth, bus_permissions
from services.common.model_store import DEFAULT_MODEL_ID
from services.common.natsserver import NatsServer
from tests.support import REPO


def _flag(argv: tuple[str, ...], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_every_service_gets_its_own_seed(tmp_path: Path):
    opts = UpOptions(state_dir=tmp_path)
    identities = nats_auth.prepare("nkeys", tmp_path, [worker_id(opts.engine)])
    specs = {spec.name: spec.argv for spec in child_specs(opts, "nats://127.0.0.1:1", tmp_path, identities=identities)}
    seeds = {name: Path(_flag(argv, "--nats-nkey")) for name, argv in specs.items()}
    assert len(set(seeds.values())) == len(specs) == 4
    assert seeds["engine"] == identities.seeds[f"engine.{worker_id(opts.engine)}"]
    assert seeds["edge"] == identities.seeds["edge"]
    for seed in seeds.values():
        assert seed.stat().st_mode & 0o777 == 0o600
        assert bus_auth.public_key(seed).startswith("U")
    again = nats_auth.prepare("nkeys", tmp_path, [worker_id(opts.engine)])
    assert {p: s.read_bytes() for p, s in again.seeds.items()} == {p: s.read_bytes() for p, s in identities.seeds.items()}


def test_an_unauthenticated_bus_passes_no_seed(tmp_path: Path):
    opts = UpOptions(state_dir=tmp_path, nats_auth="none")
    identities = nats_auth.prepare("none", tmp_path, [worker_id(opts.engine)])
    for spec in child_specs(opts, "nats://127.0.0.1:1", tmp_path, identities=identities):
        assert "--nats-nkey" not in spec.argv
    assert not bus_auth.nkeys_dir(tmp_path).exists()


@pytest.mark.parametrize("url", ["nats://10.1.2.3:4222", "nats://127.0.0.1:4222,nats://nats.example.com:4222",
                                 "nats://0.0.0.0:4222"])
def test_no_auth_is_refused_beyond_loopback(url: str):
    with pytest.raises(CliError, match="--nats-auth none is for a development server on loopback only"):
        nats_auth.check_unauthenticated("none", url)
    nats_auth.check_unauthenticated("nkeys", url)  # authenticated: anywhere


def test_no_auth_on_loopback_is_allowed():
    nats_auth.check_unauthenticated("none", None)  # the embedded server binds 127.0.0.1
    nats_auth.check_unauthenticated("none", "nats://127.0.0.1:4222,nats://localhost:4223")


def test_up_refuses_an_unauthenticated_remote_bus_before_starting_anything(tmp_path: Path):
    result = subprocess.run([sys.executable, "-m", "services.cli", "up", "--nats-auth", "none", "--nats-url",
                             "nats://192.0.2.1:4222", "--state-dir", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "refusing an unauthenticated bus at nats://192.0.2.1:4222" in result.stderr
    assert not (tmp_path / "cy-up.pid").exists()


def test_banner_says_whether_the_bus_is_authenticated(tmp_path: Path):
    on = ready_banner("http://127.0.0.1:8080", "nats://127.0.0.1:4222", DEFAULT_MODEL_ID, [], "127.0.0.1", "logs",
                      nats_seeds=tmp_path)
    off = ready_banner("http://127.0.0.1:8080", "nats://127.0.0.1:4222", DEFAULT_MODEL_ID, [], "127.0.0.1", "logs")
    assert "authenticated: one nkey user per service" in on and str(tmp_path / "operator.nk") in on
    assert "unauthenticated bus" in off and "authenticated: one" not in off


def test_nats_permissions_prints_every_identity(tmp_path: Path):
    result = subprocess.run([sys.executable, "-m", "services.cli", "nats", "permissions", "--worker", "gpu-1",
                             "--worker", "gpu-2", "--state-dir", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    headers = [line.split()[0] for line in result.stdout.splitlines() if line and not line.startswith(" ")]
    assert headers == ["edge", "scheduler", "engine.gpu-1", "engine.gpu-2", "trainer", "operator", "producer"]
    engine_1 = result.stdout.split("engine.gpu-1", 1)[1].split("engine.gpu-2", 1)[0]
    assert f"subscribe  {names.engine_generate('gpu-1')}" in engine_1 and "gpu-2" not in engine_1
    assert not bus_auth.nkeys_dir(tmp_path).exists()  # reviewing permissions creates no seeds


def test_nats_permissions_conf_is_the_servers_authorization_block(tmp_path: Path):
    result = subprocess.run([sys.executable, "-m", "services.cli", "nats", "permissions", "--format", "conf",
                             "--worker", "w1", "--state-dir", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    seeds = bus_auth.nkeys_dir(tmp_path.resolve())
    assert result.stdout.startswith("authorization {")
    for identity in (*bus_permissions.SERVICE_IDENTITIES, "engine.w1"):
        seed = bus_auth.seed_path(seeds, identity)
        assert bus_auth.public_key(seed) in result.stdout
        assert seed.read_text().strip() not in result.stdout


def test_rotating_a_seed_refuses_the_old_key_from_the_next_start(tmp_path: Path):
    identities = nats_auth.prepare("nkeys", tmp_path, ["w1"])
    config = nats_auth.write_server_config(identities, nats_auth.SERVER_CONFIG, tmp_path)
    seed = identities.seeds["trainer"]
    old = tmp_path / "old-trainer.nk"
    old.write_bytes(seed.read_bytes())

    async def connect(seed_file: Path) -> None:
        nc = await nats.connect(server.url, nkeys_seed=str(seed_file), allow_reconnect=False, max_reconnect_attempts=0)
        await nc.close()

    server = NatsServer(tmp_path / "nats", config=config, log_file=tmp_path / "nats.log").start()
    try:
        with pytest.raises(CliError, match="stop the platform first"):
            nats_auth.rotate(tmp_path, "trainer")  # a running service could not follow
    finally:
        server.stop()
    assert "rewritten" in nats_auth.rotate(tmp_path, "trainer")
    assert seed.read_bytes() != old.read_bytes() and seed.stat().st_mode & 0o777 == 0o600
    server = NatsServer(tmp_path / "nats", config=config, log_file=tmp_path / "nats.log").start()
    try:
        asyncio.run(connect(seed))
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            asyncio.run(connect(old))
        asyncio.run(connect(identities.seeds["edge"]))  # the others keep their keys
    finally:
        server.stop()


# sync: ./cy up --fsync starts the server from a copy of its config, which a reload must rewrite too.
@pytest.mark.parametrize("sync", [None, "always"])
def test_an_api_keys_nats_user_joins_the_running_bus_and_leaves_it_when_revoked(tmp_path: Path, capsys, sync):
    identities = nats_auth.prepare("nkeys", tmp_path, ["w1"])
    config = nats_auth.write_server_config(identities, nats_auth.SERVER_CONFIG, tmp_path)
    operator = identities.nkey("operator")
    (tmp_path / "logs").mkdir()  # where ./cy up keeps the server's log (reloads are read from it)
    server = NatsServer(tmp_path / "nats", config=config, log_file=tmp_path / "logs" / "nats.log", sync=sync).start()
    try:
        asyncio.run(_provision(server.url, operator))
        keys.create(server.url, "bob", ["inference"], nkey=operator, nats_state_dir=tmp_path)
        out = capsys.readouterr().out
        seed = next(line for line in out.splitlines() if line.startswith("SU"))
        key_id = re.search(r"created key ([0-9a-f]{12})", out).group(1)
        assert "reloaded" in out
        asyncio.run(_producer_session(server.url, seed, key_id, revoke=lambda: keys.revoke(
            server.url, key_id, nkey=operator, state_dir=tmp_path)))
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            asyncio.run(nats.connect(server.url, nkeys_seed_str=seed, allow_reconnect=False, max_reconnect_attempts=0))
    finally:
        server.stop()


async def _provision(url: str, operator: str) -> None:
    nc = await nats.connect(url, nkeys_seed=operator, inbox_prefix=names.identity_inbox("operator"))
    await provision.apply(nc.jetstream())
    await nc.close()


async def _producer_session(url: str, seed: str, key_id: str, revoke) -> None:
    """As the key's producer: submit and hear its own inbox; another inbox is refused; revocation cuts it off."""
    refused, closed = asyncio.Event(), asyncio.Event()

    async def on_error(exc: Exception) -> None:
        if '"_inbox.producer.>"' in str(exc).lower():
            refused.set()

    async def on_disconnect() -> None:
        closed.set()

    nc = await nats.connect(url, nkeys_seed_str=seed, inbox_prefix=names.identity_inbox(key_id), error_cb=on_error,
                            disconnected_cb=on_disconnect, allow_reconnect=False, max_reconnect_attempts=0)
    try:
        inbox = await nc.subscribe(nc.new_inbox())
        ack = await nc.jetstream().publish(names.infer_keyed(key_id, "normal"), b"{}")
        assert ack.stream == names.INFER_KEYED_STREAM and inbox.subject.startswith(f"_INBOX.{key_id}.")
        await nc.subscribe("_INBOX.producer.>")
        async with asyncio.timeout(30):  # hang guards: the server answers both at once
            await refused.wait()
            await asyncio.to_thread(revoke)  # the server reloads without this user and closes its connection
            await closed.wait()
    finally:
        await nc.close()


def test_nats_site_writes_a_private_leaf_config_and_grants_the_site_only_its_engines_subjects(tmp_path: Path):
    run = subprocess.run([sys.executable, "-m", "services.cli", "nats", "site", "tokyo", "--worker", "tokyo-gpu0",
                          "--hub", "nats-leaf://hub-a:7422,nats-leaf://hub-b:7422", "--hub-domain", "core",
                          "--listen", "127.0.0.1:4333", "--state-dir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    leaf = tmp_path / "nats" / "site-tokyo.conf"
    assert leaf.stat().st_mode & 0o777 == 0o600  # it holds the site's seed
    text = leaf.read_text()
    assert '"$JS.API.>": "$JS.core.API.>"' in text and '"$KV.>": "$JS.core.API.$KV.>"' in text
    assert '"nats-leaf://hub-a:7422", "nats-leaf://hub-b:7422"' in text and "listen: 127.0.0.1:4333" in text
    assert not re.search(r"^\s*jetstream", text, re.M | re.I)  # the site runs no JetStream of its own
    site = bus_permissions.leaf_site("tokyo", ["tokyo-gpu0"], "core")
    assert bus_auth.public_key(tmp_path / "nats" / "nkeys" / "site-tokyo.nk") in run.stdout
    assert "domain: core" in run.stdout
    assert not any(s.startswith("llm.v1.infer.submit") for s in site.publish + site.subscribe)
    assert "llm.v1.engine.tokyo-gpu0.generate" in site.subscribe
    assert "$JS.core.API.$KV.llm_workers.tokyo-gpu0" in site.publish
    assert not any("engine.other" in s for s in site.subscribe)
    helped = subprocess.run([sys.executable, "-m", "services.cli", "nats", "site", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    for flag in ("--worker", "--hub", "--hub-domain", "--listen", "--state-dir"):
        assert flag in helped.stdout
