"""Test support: "hosts" as Linux network namespaces on a private bridge, for tests of a multi-host deployment.

Each ``Host`` is a network namespace with one veth leg on a bridge the test creates (a private
/24; the root namespace, where the test and its OpenAI client run, is ``.1`` on the bridge). A
process started with ``Host.start`` runs under ``ip netns exec``: it sees only its own interfaces,
so nothing can reach another part over loopback. Every name carries a random suffix, so a crashed
run never blocks the next; ``close`` (a finalizer) kills what was started, deletes the namespaces
and the bridge whatever happened. Needs root and iproute2; ``unavailable()`` says why not.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable() -> str | None:
    """Why namespaces cannot be created here (not root, no iproute2, a refusing kernel or sandbox); None if they can."""
    if shutil.which("ip") is None:
        return "iproute2's 'ip' is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"cy-probe-{uuid.uuid4().hex[:8]}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"'ip netns add' fails here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _free_subnet() -> str:
    """A 10.x.y.0/24 prefix (``10.x.y``) that no interface of the root namespace uses."""
    used = _ip("-o", "-4", "addr", "show").stdout
    for _ in range(100):
        prefix = f"10.{random.randint(100, 250)}.{random.randint(0, 255)}"
        if f" {prefix}." not in used:
            return prefix
    raise RuntimeError("no free 10.x.y.0/24 subnet found")


@dataclass
class Host:
    """One namespace: its name, address on the bridge, own directory, and the processes started in it."""

    name: str
    netns: str
    address: str
    root: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def start(self, argv: list[str], log_name: str, env: dict[str, str], cwd: Path) -> subprocess.Popen:
        """Run ``argv`` inside this host's namespace, its output in ``<root>/<log_name>``."""
        log = (self.root / log_name).open("ab")
        proc = subprocess.Popen(["ip", "netns", "exec", self.netns, *argv], stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=cwd, start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def log(self, log_name: str) -> str:
        """What a process of this host wrote so far."""
        path = self.root / log_name
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every process started here (their groups), SIGKILL what outlives ``timeout``; last first."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


class Hosts:
    """The bridge and the namespaces of one test run (use as a context manager)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.suffix = uuid.uuid4().hex[:6]
        self.bridge = f"cyb{self.suffix}"
        self.prefix = _free_subnet()
        self.gateway = f"{self.prefix}.1"
        self.hosts: dict[str, Host] = {}
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def add(self, name: str) -> Host:
        """A new host called ``name``: its namespace, a veth pair onto the bridge, an address, its own directory."""
        index = len(self.hosts) + 1
        netns = f"cy-{self.suffix}-{name}"
        outer, inner = f"cv{self.suffix}{index}", f"ci{self.suffix}{index}"
        address = f"{self.prefix}.{10 + index}"
        _ip("netns", "add", netns)
        host = Host(name, netns, address, self.base / name)
        self.hosts[name] = host  # from here on, close() removes it
        host.root.mkdir(parents=True, exist_ok=True)
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", netns)
        _ip("link", "set", outer, "master", self.bridge, "up")
        for args in (("addr", "add", f"{address}/24", "dev", inner), ("link", "set", inner, "up"),
                     ("link", "set", "lo", "up")):
            _ip("netns", "exec", netns, "ip", *args)
        return host

    def close(self) -> None:
        """Stop every process, delete every namespace (their veths go with them) and the bridge."""
        for host in reversed(list(self.hosts.values())):
            with contextlib.suppress(Exception):
                host.stop()
            # Anything still in the namespace that was not ours to track (a grandchild) goes too.
            pids = _ip("netns", "pids", host.netns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", host.netns, check=False)
        _ip("link", "del", self.bridge, check=False)

    def __enter__(self) -> "Hosts":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
