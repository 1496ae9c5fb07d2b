"""Process lifecycle shared by every service: logging, event loop, signals."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


def setup_logging(service: str) -> None:
    """One log format for every process (the launcher interleaves their output)."""
    level = os.environ.get("CY_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format=f"%(asctime)s {service:<9} %(levelname)-5s %(name)s: %(message)s")


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM/SIGINT set ``stop``; a second signal is a no-op (shutdown is already under way)."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.info("signal %s ignored: already shutting down", signal.Signals(signum).name)
            return
        log.info("signal %s: shutting down", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


def run(main: Callable[[], Awaitable[None]]) -> None:
    """Run ``main`` on uvloop when available (measurably faster on the token path), else asyncio."""
    try:
        import uvloop
    except ImportError:  # optional on platforms without uvloop
        asyncio.run(main())
        return
    uvloop.run(main())
