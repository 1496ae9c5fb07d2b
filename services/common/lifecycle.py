"""Process lifecycle shared by every service: logging, event loop, signals, stopping tasks."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

from services.common import gc_heap

log = logging.getLogger(__name__)

# How long a cancelled task gets to end before it is cancelled again (see ``cancel_and_wait``).
_RECANCEL_AFTER = 0.1


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
    """Run a service's ``main`` on uvloop when available (measurably faster on the token path), else asyncio.

    Also marks the process as a service, whose heap ``gc_heap.freeze`` freezes once it has started.
    """
    gc_heap.enable()
    try:
        import uvloop
    except ImportError:  # optional on platforms without uvloop
        asyncio.run(main())
        return
    uvloop.run(main())


async def cancel_and_wait(*tasks: asyncio.Future | None) -> None:
    """Cancel ``tasks`` (``None`` entries are skipped) and return once every one has ended.

    A single ``cancel()`` is not enough on Python 3.11: when it lands just as the future that
    ``asyncio.wait_for`` guards completes (every nats-py request and JetStream API call runs under
    one), ``wait_for`` returns the result instead of raising, the cancellation is lost, and a
    ``while True`` loop goes on for ever; whoever awaits it hangs. So a task still running after
    ``_RECANCEL_AFTER`` seconds is cancelled again. The tasks' exceptions are retrieved, not raised.
    """
    pending = {task for task in tasks if task is not None}
    while pending := {task for task in pending if not task.done()}:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=_RECANCEL_AFTER)
    await asyncio.gather(*(task for task in tasks if task is not None), return_exceptions=True)


async def ticks(interval: float) -> AsyncIterator[bool]:
    """Every ``interval`` seconds: ``True`` for a tick on time, ``False`` for one more than an interval late.

    A late tick means this event loop was held up (a long collector pause, a starved host), so
    messages that arrived meanwhile may still lie unread in its sockets. A loop that judges
    engines dead by their heartbeats skips such a tick: judged then, an engine that kept beating
    looks as silent as the loop was, and its heartbeats are read a moment later. Only one tick in
    a row is ``False``: a loop held up all the time still judges, one tick later.
    """
    loop = asyncio.get_running_loop()
    due = loop.time() + interval
    skipped = False
    while True:
        await asyncio.sleep(max(0.0, due - loop.time()))
        on_time = skipped or loop.time() - due <= interval
        skipped = not on_time
        yield on_time
        due = loop.time() + interval
