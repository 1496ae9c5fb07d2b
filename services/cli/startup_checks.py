"""What ``./cy up`` checks before it starts anything, and how it treats signals while it starts and stops."""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from services.cli import nats_auth
from services.cli.banner import is_loopback
from services.cli.errors import CliError
from services.cli.supervisor import report_stderr


def check_exposure(opts) -> None:
    """The edge refuses to serve beyond loopback without auth; say so before starting anything."""
    if opts.auth == "none" and not is_loopback(opts.host):
        raise CliError(f"refusing to serve on {opts.host or 'all interfaces'} without authentication: "
                       "add --auth keys (then create keys with ./cy keys create --name NAME --scope inference), "
                       "or keep the default --host 127.0.0.1")
    nats_auth.check_unauthenticated(opts.nats_auth, opts.nats.nats_url if opts.nats is not None else None)


def check_port_free(host: str, port: int, what: str = "the edge", flag: str = "--port") -> None:
    """Fail before starting anything if ``what`` could not bind its port."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CliError(f"--host {host!r} is not an address of this machine: {exc}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds: TIME_WAIT is no conflict
        try:
            probe.bind(address)
        except OSError as exc:
            raise CliError(f"{what} cannot listen on {host}:{port} ({exc.strerror}): is another ./cy up "
                           f"running? choose another {flag}") from None


@contextmanager
def sigterm_raises_interrupt() -> Iterator[None]:
    """Before the event loop runs, make SIGTERM unwind like Ctrl-C so nats-server gets stopped."""
    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def signals_ignored() -> Iterator[None]:
    """During the last shutdown step a further Ctrl-C/SIGTERM is acknowledged, not obeyed."""
    def ignore(signum: int, frame: FrameType | None) -> None:
        report_stderr(f"{signal.Signals(signum).name} ignored: already shutting down")

    previous = {sig: signal.signal(sig, ignore) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
