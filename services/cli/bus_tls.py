"""``./cy up --nats-tls``: whether the embedded NATS nodes speak TLS, and with which files.

``auto`` (the default) turns TLS on for ``--nats-cluster`` (routes between nodes, and every client)
and leaves a single loopback node plain: its traffic never leaves this host, and a service reaches
it only through loopback. ``on`` forces it for a single node too; ``off`` turns it off (a cluster's
routes then still need the route user's password). The files are the state dir's local CA and node
certificate (``services.common.nats_tls``), or the operator's own (``--nats-tls-ca/-cert/-key``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from services.cli.errors import CliError
from services.common import nats_tls
from services.common.nats_tls import TlsFiles

TLS_MODES = ("auto", "on", "off")


def wants_tls(mode: str, cluster_size: int) -> bool:
    """Whether the embedded nodes use TLS: ``auto`` means on for a cluster, off for one loopback node."""
    return mode == "on" or (mode == "auto" and cluster_size > 1)


def own_files(args: argparse.Namespace) -> TlsFiles | None:
    """The operator's own CA, certificate and key for the embedded nodes (``./cy up`` without ``--nats-url``)."""
    given = (args.nats_tls_ca, args.nats_tls_cert, args.nats_tls_key)
    if args.nats_url or not any(given):
        return None
    if not all(given):
        raise CliError("to bring your own TLS files for the embedded nats-server give all three: "
                       "--nats-tls-ca CA.pem --nats-tls-cert CERT.pem --nats-tls-key KEY.pem")
    return TlsFiles(*(Path(p).resolve() for p in given))


def embedded_tls(mode: str, cluster_size: int, state_dir: Path, own: TlsFiles | None,
                 extra_sans: tuple[str, ...]) -> TlsFiles | None:
    """The files the embedded nodes serve TLS with, or None for plain TCP.

    Without ``own`` files: the state dir's local CA (created on first run) and a node certificate
    covering loopback, this host's name and ``extra_sans``.
    """
    if own is not None and mode == "off":
        raise CliError("--nats-tls off with --nats-tls-cert: drop one of them")
    if own is None and not wants_tls(mode, cluster_size):
        return None
    if own is None:
        return nats_tls.ensure_local_tls(nats_tls.tls_dir(state_dir), nats_tls.wanted_sans(extra_sans))
    for path in (own.ca, own.cert, own.key):
        if not path.is_file():
            raise CliError(f"{path}: no such file")
    if "127.0.0.1" not in nats_tls.cert_sans(own.cert):
        raise CliError(f"{own.cert} is not valid for 127.0.0.1, where the services reach the embedded nodes: "
                       "add it to the certificate's subject alternative names")
    return own


def state_ca(state_dir: Path) -> str:
    """The state dir's local CA (what an operator command trusts by default), or "" if it has none."""
    ca = nats_tls.tls_dir(state_dir) / nats_tls.CA_FILE
    return str(ca) if ca.is_file() else ""
