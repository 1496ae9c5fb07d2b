"""Per-caller rate limits shared by every edge replica, kept in the ``LLM_RATE`` counter stream.

Each budget is a JetStream counter (``Nats-Incr``, nats-server >= 2.12): the server adds
atomically and acknowledges the new total, so replicas never race on read-modify-write and no
compare-and-set retries are needed. A request costs one round trip, the counters it needs
being touched concurrently: ``+1`` on this minute's requests, a direct read of this minute's
tokens, and ``+1`` on the current lease epoch's streams for a stream. A rejected request takes
back what it added. Tokens are added when a request ends, from its usage.

If the counters cannot be reached, requests are admitted (and a warning logged): a rate limit
protects the platform, it must not be the reason it is down.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable

import nats.errors
from aiohttp import web
from nats.js import JetStreamContext

from schemas import names
from schemas.errors import BusError, ErrorCode
from services.common.lifecycle import cancel_and_wait
from services.common import rate_window
from services.common.rate_counters import CounterStore
from services.edge.auth.authenticator import PRINCIPAL
from services.edge.metrics import EdgeMetrics
from services.common.rate_window import RateLimits, RateUsage

log = logging.getLogger(__name__)

# Headers of the request's rate-limit state; ``add_rate_headers`` puts them on whatever response it gets.
RATE_HEADERS = web.RequestKey("rate_headers", dict)


class _Lease:
    """One running stream, and the epochs it is counted in."""

    __slots__ = ("caller", "epochs")

    def __init__(self, caller: str, epochs: list[int]) -> None:
        self.caller = caller
        self.epochs = set(epochs)


class StreamLeases:
    """This edge's running streams, counted per caller in lease epochs and renewed while they run."""

    def __init__(self, counters: CounterStore, *, clock: Callable[[], float] = time.time,
                 epoch: float = rate_window.LEASE_EPOCH_SECONDS,
                 margin: float = rate_window.LEASE_RENEW_MARGIN) -> None:
        self._counters = counters
        self._clock = clock
        self._epoch = epoch
        self._margin = margin
        self._active: dict[int, _Lease] = {}
        self._ids = itertools.count()
        self._task: asyncio.Task | None = None

    def _subject(self, caller: str, epoch: int) -> str:
        return names.rate_counter(caller, rate_window.STREAMS, epoch)

    async def acquire(self, caller: str) -> tuple[int, int]:
        """Count a new stream of ``caller``; return its lease id and the caller's streams now (this one included)."""
        epochs = rate_window.lease_epochs(self._clock(), self._epoch, self._margin)
        lease_id = next(self._ids)
        self._active[lease_id] = _Lease(caller, epochs)
        totals = await asyncio.gather(*(self._counters.add(self._subject(caller, e), 1) for e in epochs))
        return lease_id, totals[0]

    async def release(self, lease_id: int) -> None:
        """Stop counting a stream (in the epochs that still matter)."""
        lease = self._active.pop(lease_id, None)
        if lease is None:
            return
        current = int(self._clock() // self._epoch)
        await asyncio.gather(*(self._counters.add(self._subject(lease.caller, e), -1)
                               for e in lease.epochs if e >= current))

    async def renew(self) -> None:
        """Count every running stream in the next epoch too (once per stream)."""
        upcoming = int(self._clock() // self._epoch) + 1
        per_caller: dict[str, int] = {}
        for lease in self._active.values():
            if upcoming not in lease.epochs:
                # Marked before the add is sent: a release racing with it then takes it back, in order.
                lease.epochs.add(upcoming)
                per_caller[lease.caller] = per_caller.get(lease.caller, 0) + 1
        await asyncio.gather(*(self._counters.add(self._subject(c, upcoming), n) for c, n in per_caller.items()))

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(rate_window.seconds_to_renewal(self._clock(), self._epoch, self._margin))
            try:
                await self.renew()
            except nats.errors.Error as exc:
                log.warning("could not renew stream leases: %s", exc)

    def start(self) -> None:
        """Renew running streams before each epoch ends, until ``stop``."""
        self._task = asyncio.create_task(self._renew_forever(), name="stream-lease-renewal")

    async def stop(self) -> None:
        """Stop renewing; leases still held expire with their epoch."""
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None


class Admission:
    """An admitted request: its rate-limit headers, and what it must give back when it ends."""

    __slots__ = ("_caller", "_lease", "_limiter", "_limits", "headers")

    def __init__(self, limiter: RateLimiter | None, caller: str, limits: RateLimits, headers: dict[str, str],
                 lease: int | None) -> None:
        self._limiter = limiter
        self._caller = caller
        self._limits = limits
        self._lease = lease
        self.headers = headers

    async def finish(self, tokens: int) -> None:
        """Charge ``tokens`` to this minute's budget and end the stream lease (once)."""
        limiter, self._limiter = self._limiter, None
        if limiter is not None:
            await limiter.finish(self._caller, self._limits, tokens, self._lease)


UNLIMITED = Admission(None, "", RateLimits(), {}, None)


class RateLimited(BusError):
    """A 429: a budget is spent; carries the ``x-ratelimit-*`` headers of the caller's state."""

    def __init__(self, message: str, retry_after: int, headers: dict[str, str]) -> None:
        super().__init__(ErrorCode.RATE_LIMITED, message, retry_after=retry_after)
        self.headers = headers


class RateLimiter:
    """Admits or rejects requests against budgets counted on the bus, on every edge together."""

    def __init__(self, js: JetStreamContext, defaults: RateLimits, metrics: EdgeMetrics, *, timeout: float,
                 retry_after: int, clock: Callable[[], float] = time.time) -> None:
        self.defaults = defaults
        self._counters = CounterStore(js, timeout=timeout)
        self._metrics = metrics
        self._retry_after = retry_after
        self._clock = clock
        self.leases = StreamLeases(self._counters, clock=clock)


    async def _acquire_stream(self, caller: str) -> tuple[int | None, int]:
        try:
            return await self.leases.acquire(caller)
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("stream lease counter unavailable (%s); admitting", type(exc).__name__)
            return None, 0

    async def _zero(self) -> int:
        return 0

    async def admit(self, caller: str, limits: RateLimits, *, stream: bool) -> Admission:
        """Count a new request of ``caller``; raise ``BusError(rate_limit_exceeded)`` if a budget is spent."""
        if not limits.enabled:
            return UNLIMITED
        window, reset = rate_window.minute_window(self._clock())
        req_subject = names.rate_counter(caller, rate_window.REQUESTS, window)
        counts_stream = stream and bool(limits.streams)
        requests, tokens, (lease, streams) = await asyncio.gather(
            self._counters.add_or_admit(req_subject, 1) if limits.rpm else self._zero(),
            self._counters.total_or_admit(names.rate_counter(caller, rate_window.TOKENS, window)) if limits.tpm else self._zero(),
            self._acquire_stream(caller) if counts_stream else _no_lease())
        used = RateUsage(requests=requests, tokens=tokens, streams=streams)
        reason = rate_window.verdict(limits, used, stream=stream)
        if reason is None:
            return Admission(self, caller, limits, rate_window.headers(limits, used, reset), lease)
        # Take back what this request added: it is not served.
        await asyncio.gather(self._counters.add_or_admit(req_subject, -1) if limits.rpm else self._zero(),
                             self._release(lease))
        self._metrics.rate_limited.labels(reason).inc()
        wait = rate_window.retry_after(reason, reset, self._retry_after)
        shown = RateUsage(requests=max(0, requests - 1), tokens=tokens, streams=streams)
        raise RateLimited(rate_window.rejection_message(reason, limits, wait), wait,
                          rate_window.headers(limits, shown, reset))

    async def _release(self, lease: int | None) -> None:
        if lease is None:
            return
        try:
            await self.leases.release(lease)
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("could not release a stream lease (%s); it expires with its epoch", type(exc).__name__)

    async def finish(self, caller: str, limits: RateLimits, tokens: int, lease: int | None) -> None:
        """A request ended: charge its tokens and end its stream lease."""
        window, _ = rate_window.minute_window(self._clock())
        await asyncio.gather(
            self._counters.add_or_admit(names.rate_counter(caller, rate_window.TOKENS, window), tokens)
            if limits.tpm and tokens > 0 else self._zero(),
            self._release(lease))


async def _no_lease() -> tuple[None, int]:
    return None, 0


def caller_of(request: web.Request) -> tuple[str, tuple[int | None, int | None, int | None]]:
    """Whose budget a request spends: its API key or JWT subject, else (no auth) its client address."""
    principal = request.get(PRINCIPAL)
    if principal is not None:
        return f"{principal.kind}-{principal.id}", principal.limits
    return f"ip-{request.remote or 'unknown'}", (None, None, None)


async def admit_request(limiter: RateLimiter | None, request: web.Request, *, stream: bool) -> Admission:
    """Admit one inference request of an HTTP client (or raise a 429); its headers go on the answer."""
    if limiter is None:
        return UNLIMITED
    caller, overrides = caller_of(request)
    try:
        admission = await limiter.admit(caller, limiter.defaults.overridden(*overrides), stream=stream)
    except RateLimited as err:
        request[RATE_HEADERS] = err.headers
        raise
    request[RATE_HEADERS] = admission.headers
    return admission


async def add_rate_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the request's ``x-ratelimit-*`` headers, on success and on a 429 alike."""
    extra = request.get(RATE_HEADERS)
    if extra:
        response.headers.update(extra)
