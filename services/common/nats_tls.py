"""TLS for the embedded NATS nodes: a local CA, the nodes' certificate, route credentials, node config.

``./cy up`` keeps everything under ``<state dir>/nats/tls/`` (directory 0700, private keys and the
route password 0600), created on first run and kept after, so restarts and running clients keep
trusting the same CA:

- ``ca.pem`` / ``ca-key.pem``: the local CA (10 years). Services get ``ca.pem`` as ``--nats-tls-ca``.
- ``server.pem`` / ``server-key.pem``: one certificate for every node, signed by the CA, valid for
  both ``serverAuth`` (clients connecting) and ``clientAuth`` (a node dialing another's route port,
  checked with ``verify: true``). SANs: localhost, 127.0.0.1, ::1, this host's name and any given;
  it is re-issued when a wanted SAN is missing or it expires within 30 days.
- ``route-password``: the secret of the cluster's route user (``cluster { authorization {} }``).

``node_config`` is the one builder of a node's own config text (its name, client TLS, cluster with
route TLS and route authorization); the deploy manifests use it too.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TLS_DIR = "tls"
CA_FILE, CA_KEY_FILE = "ca.pem", "ca-key.pem"
CERT_FILE, KEY_FILE = "server.pem", "server-key.pem"
ROUTE_PASSWORD_FILE = "route-password"
ROUTE_USER = "cy-route"
CA_DAYS, CERT_DAYS, RENEW_DAYS = 3650, 825, 30
DEFAULT_SANS = ("localhost", "127.0.0.1", "::1")
# How long a TLS handshake may take before the server drops the connection (nats-server's default 0.5 s
# is tight on a loaded machine with many reconnecting clients).
HANDSHAKE_TIMEOUT = 2


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files a node serves TLS with: the CA that signed ``cert``, ``cert`` and its ``key``."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class RouteAuth:
    """The user a node presents on another node's route port (every node accepts only it)."""

    user: str
    password: str


def tls_dir(state_dir: Path) -> Path:
    """Where ``./cy up`` keeps its CA, the nodes' certificate and the route password."""
    return state_dir / "nats" / TLS_DIR


def wanted_sans(extra: Iterable[str] = ()) -> list[str]:
    """The names a node certificate must cover: loopback, this host's name, and ``extra``."""
    names = [*DEFAULT_SANS, socket.gethostname(), *extra]
    return list(dict.fromkeys(n.strip() for n in names if n and n.strip() and n.strip() not in ("0.0.0.0", "::")))


def ensure_local_tls(directory: Path, sans: Iterable[str]) -> TlsFiles:
    """The local CA and a node certificate covering ``sans``: created on first use, kept after.

    The CA is never replaced (clients trust it); the certificate is re-issued by it when a SAN is
    missing or it expires within ``RENEW_DAYS``.
    """
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = TlsFiles(directory / CA_FILE, directory / CERT_FILE, directory / KEY_FILE)
    ca_key_path = directory / CA_KEY_FILE
    if not files.ca.exists() or not ca_key_path.exists():
        ca_key = ec.generate_private_key(ec.SECP256R1())
        _write_private(ca_key_path, _key_pem(ca_key))
        files.ca.write_bytes(_new_ca(ca_key).public_bytes(serialization.Encoding.PEM))
        files.cert.unlink(missing_ok=True)
    wanted = list(sans)
    if not files.key.exists() or not _cert_is_current(files.cert, wanted):
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(files.ca.read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        _write_private(files.key, _key_pem(key))
        files.cert.write_bytes(_issue(ca_cert, ca_key, key, wanted).public_bytes(serialization.Encoding.PEM))
    return files


def ensure_route_auth(directory: Path) -> RouteAuth:
    """The route user and its password (created once, 0600), the same for every node of the cluster."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / ROUTE_PASSWORD_FILE
    if not path.exists():
        _write_private(path, secrets.token_urlsafe(32).encode())
    return RouteAuth(ROUTE_USER, path.read_text().strip())


def cert_sans(cert_file: Path) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*ext.get_values_for_type(x509.DNSName), *(str(ip) for ip in ext.get_values_for_type(x509.IPAddress))]


def tls_block(files: TlsFiles, *, verify: bool, indent: str = "") -> str:
    """A nats-server ``tls {}`` block; ``verify``: the peer must present a certificate signed by the CA."""
    lines = ["tls {", f"  cert_file: {_quoted(files.cert)}", f"  key_file: {_quoted(files.key)}",
             f"  ca_file: {_quoted(files.ca)}", f"  verify: {'true' if verify else 'false'}",
             f"  timeout: {HANDSHAKE_TIMEOUT}", "}"]
    return "\n".join(indent + line for line in lines) + "\n"


def route_url(host: str, port: int, auth: RouteAuth | None) -> str:
    """How a node dials another's route port (with the route user's credentials when routes are authorized)."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"nats-route://{auth.user}:{auth.password}@{where}" if auth else f"nats-route://{where}"


def node_config(server_name: str | None, *, tls: TlsFiles | None = None, cluster: str | None = None,
                route_listen: str = "", routes: Iterable[str] = (), route_auth: RouteAuth | None = None) -> str:
    """The config text of one node (after the shared ``infra/nats/server.conf`` part; ``server_name``
    None keeps that part's).

    ``tls``: clients must speak TLS (server certificate only: clients authenticate with their nkey);
    in a ``cluster`` the routes use TLS too, with ``verify: true`` (a route without a certificate of
    the CA is refused). ``route_listen`` is ``host:port``; ``routes`` the other nodes' ``route_url``s;
    ``route_auth`` the user every route must present (None: routes are unauthenticated, loopback only).
    """
    text = f"server_name: {server_name}\n" if server_name else ""
    if tls is not None:
        text += tls_block(tls, verify=False)
    if cluster is None:
        return text
    body = [f"  name: {cluster}", f"  listen: \"{route_listen}\""]
    if route_auth is not None:
        body.append("  authorization {\n"
                    f"    user: {_quoted(route_auth.user)}\n    password: {_quoted(route_auth.password)}\n"
                    "    timeout: 2\n  }")
    if tls is not None:
        body.append(tls_block(tls, verify=True, indent="  ").rstrip("\n"))
    body.append("  routes: [" + ", ".join(f'"{r}"' for r in routes) + "]")
    return text + "cluster {\n" + "\n".join(body) + "\n}\n"


def _quoted(value: object) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only (a fresh 0600 file, never a widened old one)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_ca(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"CY-LLM local NATS CA ({socket.gethostname()})")])
    now = _now()
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))


def _general_name(san: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(san))
    except ValueError:
        return x509.DNSName(san)


def _issue(ca_cert: x509.Certificate, ca_key, key: ec.EllipticCurvePrivateKey, sans: list[str]) -> x509.Certificate:
    now = _now()
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cy-nats")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([_general_name(s) for s in sans]), critical=False)
            # A node is a server to clients and a client of the other nodes' route ports.
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))


def _cert_is_current(cert_file: Path, sans: list[str]) -> bool:
    """The certificate exists, covers every SAN in ``sans`` and is not about to expire."""
    if not cert_file.exists():
        return False
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    if cert.not_valid_after_utc - _now() < datetime.timedelta(days=RENEW_DAYS):
        return False
    have = {str(ipaddress.ip_address(s)) if _is_ip(s) else s.lower() for s in cert_sans(cert_file)}
    return all((str(ipaddress.ip_address(s)) if _is_ip(s) else s.lower()) in have for s in sans)


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True
