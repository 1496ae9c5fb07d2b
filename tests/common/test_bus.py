"""services.common.bus: one parser of NATS addresses and options, and services that take a server list."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import uuid

import nats
import nats.errors
import pytest
from nats.js.errors import KeyNotFoundError

from schemas import names
from services.cli.nats_auth import SERVER_CONFIG
from services.common import bus_auth, bus_permissions
from services.common.bus import (NatsOptions, add_nats_arguments, child_arguments, connect, connect_kwargs,
                                 option_problems, options_from_args, server_list)
from services.common.natsserver import NatsServer, free_ports
from tests.support import REPO, wait_for


def test_a_comma_separated_list_becomes_a_list_of_urls():
    assert server_list("a:4222, nats://b:4223,,tls://c:4224") == [
        "nats://a:4222", "nats://b:4223", "tls://c:4224"]
    assert NatsOptions(nats_url="nats://a:1,nats://b:2").servers == ["nats://a:1", "nats://b:2"]


@pytest.mark.parametrize("bad", ["", " , ", "http://a:1", "nats://a:1/x"])
def test_a_malformed_list_is_refused(bad: str):
    with pytest.raises(ValueError):
        server_list(bad)


def _parse(argv: list[str], env: dict[str, str]) -> argparse.Namespace:
    saved = dict(os.environ)
    try:
        for var in ("CY_NATS_URL", "NATS_URL", "CY_NATS_CREDS", "NATS_CREDS", "NATS_CA", "NATS_CERT", "NATS_KEY"):
            os.environ.pop(var, None)
        os.environ.update(env)
        parser = argparse.ArgumentParser()
        add_nats_arguments(parser)
        return parser.parse_args(argv)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_flags_and_environment_are_read_as_the_nats_cli_names_them():
    assert _parse([], {}).nats_url == "nats://127.0.0.1:4222"
    assert _parse([], {"NATS_URL": "a:1,b:2"}).nats_url == "nats://a:1,nats://b:2"
    assert _parse([], {"NATS_URL": "a:1", "CY_NATS_URL": "c:3"}).nats_url == "nats://c:3"
    args = _parse(["--nats-url", "x:1,y:2", "--nats-tls-ca", "ca.pem"], {"NATS_CREDS": "u.creds"})
    options = options_from_args(args)
    assert options == NatsOptions(nats_url="nats://x:1,nats://y:2", nats_creds="u.creds", nats_tls_ca="ca.pem")
    assert child_arguments(options) == ["--nats-url", "nats://x:1,nats://y:2", "--nats-creds", "u.creds",
                                        "--nats-tls-ca", "ca.pem"]
    with pytest.raises(SystemExit):
        _parse(["--nats-url", "http://x"], {})


def test_missing_credential_files_are_named(tmp_path):
    problems = option_problems(NatsOptions(nats_creds=str(tmp_path / "none.creds"), nats_tls_cert="c.pem"))
    assert any("--nats-creds" in p for p in problems)
    assert any("--nats-tls-cert and --nats-tls-key go together" in p for p in problems)


def test_connect_arguments_carry_the_list_and_tls(tmp_path):
    kwargs = connect_kwargs(NatsOptions(nats_url="tls://a:1,tls://b:2"))
    assert kwargs["servers"] == ["tls://a:1", "tls://b:2"] and "tls" in kwargs


@pytest.mark.parametrize("flag", ["--nats-url", "env"])
async def test_a_service_given_two_servers_connects_to_the_live_one(nc, nats_server, flag, tmp_path):
    dead = f"nats://127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    servers = f"{dead},{nats_server.url}"
    worker = f"w-{uuid.uuid4().hex[:8]}"
    argv = [sys.executable, "-m", "services.engine", "--engine", "simulated", "--model-id", "sim",
            "--worker-id", worker, "--heartbeat-interval", "0.2"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if flag == "env":
        env["NATS_URL"] = servers
        env.pop("CY_NATS_URL", None)
    else:
        argv += ["--nats-url", servers]
    log = (tmp_path / "engine.log").open("wb")
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        kv = await nc.jetstream().key_value(names.WORKERS_BUCKET)

        async def heartbeating() -> bool:
            try:
                return (await kv.get(worker)).value is not None
            except KeyNotFoundError:  # until the first heartbeat
                return False

        assert await wait_for(heartbeating, timeout=60), (tmp_path / "engine.log").read_text()
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_nkey_is_one_of_the_options_and_is_handed_on():
    assert _parse([], {"CY_NATS_NKEY": "edge.nk"}).nats_nkey == "edge.nk"
    options = options_from_args(_parse(["--nats-url", "a:1,b:2", "--nats-nkey", "engine.nk"], {}))
    assert options.nats_nkey == "engine.nk"
    assert child_arguments(options) == ["--nats-url", "nats://a:1,nats://b:2", "--nats-nkey", "engine.nk"]
    assert connect_kwargs(options)["nkeys_seed"] == "engine.nk"
    assert any("--nats-nkey" in p for p in option_problems(options))  # no such file here


async def test_connect_authenticates_with_the_options_nkey_on_any_node_of_the_list(tmp_path):
    seeds = bus_auth.ensure_seeds(tmp_path / "nkeys", [bus_permissions.identities([])[bus_permissions.SCHEDULER]])
    seed = seeds[bus_permissions.SCHEDULER]
    config = bus_auth.write_server_config(SERVER_CONFIG, tmp_path / "auth.conf", seeds, bus_permissions.identities([]))
    dead = f"nats://127.0.0.1:{free_ports(1)[0]}"
    with NatsServer(tmp_path / "nats", config=config) as server:
        options = NatsOptions(nats_url=f"{dead},{server.url}", nats_nkey=str(seed))
        nc = await connect(options, "pytest", inbox=names.identity_inbox(bus_permissions.SCHEDULER))
        try:
            assert nc.is_connected and nc.connected_url.port == server.client_port
        finally:
            await nc.close()
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(server.url, allow_reconnect=False, max_reconnect_attempts=0)
