"""``./cy up --nats-tls``: when the embedded nodes use TLS, which files, and a single TLS node end to end."""

from __future__ import annotations

import argparse
import re
import ssl
from pathlib import Path

import aiohttp
import nats
import pytest

from services.cli import bus_tls
from services.cli.errors import CliError
from services.cli.main import build_parser
from services.common import nats_tls
from services.common.model_store import DEFAULT_MODEL_ID
from tests.support import CyUp, state_dir_with_models


def test_auto_means_tls_for_a_cluster_and_not_for_one_loopback_node():
    assert [bus_tls.wants_tls("auto", n) for n in (1, 3)] == [False, True]
    assert bus_tls.wants_tls("on", 1) and not bus_tls.wants_tls("off", 3)


def test_up_help_lists_the_tls_flags():
    text = build_parser()._subparsers._group_actions[0].choices["up"].format_help()
    for flag in ("--nats-tls {auto,on,off}", "--nats-tls-san NAME", "--nats-tls-ca FILE", "--nats-tls-cert FILE"):
        assert flag in text, flag


def _args(**given) -> argparse.Namespace:
    return argparse.Namespace(**{"nats_url": None, "nats_tls_ca": "", "nats_tls_cert": "", "nats_tls_key": "", **given})


def test_bring_your_own_needs_all_three_files_and_a_certificate_for_loopback(tmp_path: Path):
    assert bus_tls.own_files(_args()) is None
    assert bus_tls.own_files(_args(nats_url="tls://nats-a:4222", nats_tls_ca="ca.pem")) is None  # a client CA
    with pytest.raises(CliError, match="give all three"):
        bus_tls.own_files(_args(nats_tls_cert="cert.pem"))
    elsewhere = nats_tls.ensure_local_tls(tmp_path / "other", ["nats-a.example.internal"])
    with pytest.raises(CliError, match="not valid for 127.0.0.1"):
        bus_tls.embedded_tls("auto", 3, tmp_path, elsewhere, ())
    with pytest.raises(CliError, match="--nats-tls off"):
        bus_tls.embedded_tls("off", 1, tmp_path, elsewhere, ())
    mine = nats_tls.ensure_local_tls(tmp_path / "mine", nats_tls.wanted_sans())
    assert bus_tls.embedded_tls("auto", 1, tmp_path, mine, ()) == mine  # own files: TLS even for one node
    assert not (tmp_path / "nats" / "tls").exists()  # nothing generated beside them
    assert bus_tls.embedded_tls("auto", 1, tmp_path, None, ()) is None


@pytest.mark.slow
async def test_one_node_with_tls_on_serves_and_refuses_a_client_without_the_ca(tmp_path, default_model_dir):
    state = state_dir_with_models(tmp_path, default_model_dir)
    with CyUp(state, "--nats-tls", "on", "--no-trainer", "--nats-tls-san", "cy.test.internal") as up:
        ca = state / "nats" / "tls" / "ca.pem"
        url = re.search(r"(tls://127\.0\.0\.1:\d+)", up.output()).group(1)
        assert f"--nats-tls-ca {ca}" in up.output()
        assert "cy.test.internal" in nats_tls.cert_sans(state / "nats" / "tls" / "server.pem")
        with pytest.raises(ssl.SSLCertVerificationError):
            await nats.connect(url, nkeys_seed=up.nkey("operator"), allow_reconnect=False, max_reconnect_attempts=0)
        async with aiohttp.ClientSession() as http:  # every service reached NATS over TLS
            body = {"model": DEFAULT_MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                    "cache": False}
            async with http.post(f"{up.url}/v1/chat/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
        assert up.bus_refusals() == []
