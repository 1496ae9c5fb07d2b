"""The rate-limit counters on the ``LLM_RATE`` stream, shared by the edge and the scheduler.

Each budget is a JetStream counter (``Nats-Incr``, nats-server >= 2.12): the server adds
atomically and acknowledges the new total, so every edge replica, every scheduler replica and
every engine count into one budget per caller without read-modify-write races. A caller is named
the same everywhere (``caller_of_key``), so HTTP and NATS-native requests of one API key share it.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from schemas import names
from services.common import rate_window

log = logging.getLogger(__name__)


def caller_of_key(key_id: str) -> str:
    """The counter name of an API key's budget (the edge names an authenticated key ``key-<id>`` too)."""
    return f"key-{key_id}"


class _CounterValue(msgspec.Struct):
    """The body of a counter message: ``{"val": "<total>"}``."""

    val: str


_counter_value = msgspec.json.Decoder(_CounterValue)


class CounterStore:
    """Atomic counters on the ``LLM_RATE`` stream."""

    def __init__(self, js: JetStreamContext, *, timeout: float) -> None:
        self._js = js
        self._timeout = timeout

    async def add(self, subject: str, delta: int) -> int:
        """Add ``delta`` and return the new total."""
        ack = await self._js.publish(subject, b"", timeout=self._timeout, headers={"Nats-Incr": f"{delta:+d}"})
        return int(ack.val or 0)

    async def total(self, subject: str) -> int:
        """The current total (0 for a counter never touched)."""
        try:
            msg = await self._js.get_last_msg(names.RATE_STREAM, subject, direct=True)
        except nats.js.errors.NotFoundError:
            return 0
        return int(_counter_value.decode(msg.data).val)

    async def add_or_admit(self, subject: str, delta: int) -> int:
        """``add``, but 0 (admit) while the counter cannot be reached: limits fail open, never block serving."""
        try:
            return await self.add(subject, delta)
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("rate counter %s unavailable (%s); admitting", subject, type(exc).__name__)
            return 0

    async def total_or_admit(self, subject: str) -> int:
        """``total``, but 0 (admit) while the counter cannot be reached."""
        try:
            return await self.total(subject)
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("rate counter %s unavailable (%s); admitting", subject, type(exc).__name__)
            return 0


async def charge_tokens(js: JetStreamContext, caller: str, tokens: int, now: float, *, timeout: float = 2.0) -> None:
    """Add a finished request's ``tokens`` to ``caller``'s budget of the minute ``now`` falls in.

    An engine charges an API key's NATS-native request this way (the edge charges its own requests);
    a counter that cannot be reached is logged, never raised: the answer has already gone out.
    """
    if tokens <= 0:
        return
    window, _ = rate_window.minute_window(now)
    subject = names.rate_counter(caller, rate_window.TOKENS, window)
    try:
        await CounterStore(js, timeout=timeout).add(subject, tokens)
    except (nats.errors.Error, TimeoutError) as exc:
        log.warning("could not charge %d tokens to %s (%s)", tokens, subject, type(exc).__name__)


class TokenCharges:
    """Token charges sent in the background (the answer must not wait for them), awaited at shutdown."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self._pending: set[asyncio.Task] = set()

    def charge(self, caller: str, tokens: int) -> None:
        """Charge ``tokens`` to ``caller``'s budget of this minute, in the background."""
        task = asyncio.create_task(charge_tokens(self._js, caller, tokens, time.time()))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def settle(self, timeout: float = 5.0) -> None:
        """Wait up to ``timeout`` for the charges still on their way."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=timeout)
