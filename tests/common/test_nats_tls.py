"""TLS on the bus and route authorization, on real nats-server nodes with real certificates.

The local CA of ``./cy up`` (``services.common.nats_tls``): a client without the CA fails the TLS
handshake, one with it works; a cluster's routes run over verified TLS, and a would-be node without
the CA's certificate or without the route password is refused as a route.
"""

from __future__ import annotations

import json
import ssl
import stat
import urllib.request
from pathlib import Path

import nats
import pytest
from cryptography import x509

from services.cli.infra import wait_for_jetstream
from services.cli.up import NATS_CONFIG
from services.common import bus, nats_tls
from services.common.bus import NatsOptions, connect_kwargs
from services.common.nats_tls import RouteAuth, TlsFiles
from services.common.natsserver import NatsCluster, NatsServer
from tests.support import log_shows


@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    """The local CA and node certificate, as ``./cy up`` makes them."""
    return nats_tls.ensure_local_tls(tmp_path / "tls", nats_tls.wanted_sans())


async def _refused_without_ca(url: str) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5)


async def _connect_with_ca(url: str, ca: Path) -> nats.NATS:
    options = NatsOptions(nats_url=url, nats_tls_ca=str(ca))
    return await nats.connect(**connect_kwargs(options), allow_reconnect=False, max_reconnect_attempts=0)


def test_local_ca_keys_are_private_and_the_ca_survives_a_new_san(tmp_path: Path) -> None:
    directory = tmp_path / "tls"
    files = nats_tls.ensure_local_tls(directory, nats_tls.wanted_sans())
    for secret in (files.key, directory / nats_tls.CA_KEY_FILE):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert {"localhost", "127.0.0.1", "::1"} <= set(nats_tls.cert_sans(files.cert))
    usage = x509.load_pem_x509_certificate(files.cert.read_bytes()).extensions.get_extension_for_class(
        x509.ExtendedKeyUsage).value
    assert {u.dotted_string for u in usage} == {"1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"}  # server and client auth

    ca, cert = files.ca.read_bytes(), files.cert.read_bytes()
    assert nats_tls.ensure_local_tls(directory, nats_tls.wanted_sans()) == files
    assert files.cert.read_bytes() == cert  # nothing to change: kept

    nats_tls.ensure_local_tls(directory, nats_tls.wanted_sans(["nats.example.internal", "10.1.2.3"]))
    assert files.ca.read_bytes() == ca  # clients keep trusting the same CA
    assert {"nats.example.internal", "10.1.2.3", "127.0.0.1"} <= set(nats_tls.cert_sans(files.cert))
    auth = nats_tls.ensure_route_auth(directory)
    assert auth == nats_tls.ensure_route_auth(directory) and len(auth.password) >= 32
    assert stat.S_IMODE((directory / nats_tls.ROUTE_PASSWORD_FILE).stat().st_mode) == 0o600


async def test_single_node_with_tls_refuses_a_client_without_the_ca(tmp_path: Path, tls_files: TlsFiles) -> None:
    with NatsServer(tmp_path / "nats", config=NATS_CONFIG, log_file=tmp_path / "nats.log", tls=True,
                    node_config=nats_tls.node_config(None, tls=tls_files)) as server:
        assert server.url.startswith("tls://")
        await _refused_without_ca(server.url)
        await _refused_without_ca(server.url.replace("tls://", "nats://"))  # the server insists on TLS
        nc = await _connect_with_ca(server.url, tls_files.ca)
        try:
            sub = await nc.subscribe("tls.check")
            await nc.publish("tls.check", b"over tls")
            assert (await sub.next_msg(timeout=5)).data == b"over tls"
        finally:
            await nc.close()


@pytest.fixture
async def tls_cluster(tmp_path: Path, tls_files: TlsFiles):
    """Three nodes with client TLS, verified route TLS and route authorization, monitoring on each."""
    cluster = NatsCluster(tmp_path / "cluster", config=NATS_CONFIG, log_dir=tmp_path, tls=tls_files,
                          route_auth=nats_tls.ensure_route_auth(tmp_path / "tls"))
    for node in cluster.nodes:
        node.monitor_port = -1
    cluster.start()
    try:
        # A meta leader needs the routes: JetStream answering proves they formed over verified TLS.
        await wait_for_jetstream(NatsOptions(nats_url=cluster.url, nats_tls_ca=str(tls_files.ca)), timeout=60)
        yield cluster
    finally:
        cluster.stop()


async def test_cluster_over_tls_routes_messages_and_refuses_clients_without_the_ca(
        tls_cluster: NatsCluster, tls_files: TlsFiles) -> None:
    for url in tls_cluster.urls:
        await _refused_without_ca(url)
    first = await _connect_with_ca(tls_cluster.urls[0], tls_files.ca)
    last = await _connect_with_ca(tls_cluster.urls[-1], tls_files.ca)
    try:
        sub = await last.subscribe("tls.routed")
        await bus.flush(last)
        # Interest reaches the first node through the routes; then a message crosses them.
        for _ in range(100):
            await first.publish("tls.routed", b"across the routes")
            try:
                assert (await sub.next_msg(timeout=0.2)).data == b"across the routes"
                break
            except nats.errors.TimeoutError:
                continue
        else:
            pytest.fail("a message published on node 1 never reached a subscriber on node 3")
    finally:
        await first.close()
        await last.close()


def _routez(monitor_url: str) -> dict:
    with urllib.request.urlopen(f"{monitor_url.rstrip('/')}/routez", timeout=5) as resp:
        return json.load(resp)


@pytest.mark.parametrize("stranger", ["no_tls_no_password", "ca_certificate_wrong_password"])
async def test_a_stranger_cannot_join_the_cluster_as_a_route(tmp_path: Path, tls_cluster: NatsCluster,
                                                            tls_files: TlsFiles, stranger: str) -> None:
    target = tls_cluster.nodes[0]
    if stranger == "no_tls_no_password":
        tls, auth, refusal = None, None, "Router connection closed: TLS Handshake Failure"
    else:  # even a certificate of the CA is not enough without the route user's password
        tls, auth, refusal = tls_files, RouteAuth(nats_tls.ROUTE_USER, "guessed"), "Router connection closed: Authentication Failure"
    config = nats_tls.node_config("stranger", tls=tls, cluster=tls_cluster.name, route_listen="127.0.0.1:-1",
                                  routes=[nats_tls.route_url("127.0.0.1", tls_cluster.route_ports[0], auth)])
    with NatsServer(tmp_path / "stranger", config=NATS_CONFIG, log_file=tmp_path / "stranger.log",
                    node_config=config, monitor_port=-1) as intruder:
        assert await log_shows(target.log_file, refusal, timeout=30), target.log_file.read_text()[-2000:]
        assert _routez(intruder.monitor_url)["num_routes"] == 0
        joined = [r.get("remote_name") for r in _routez(target.monitor_url).get("routes") or []]
        assert "stranger" not in joined and set(joined) == {"cy-cluster-n2", "cy-cluster-n3"}, joined
