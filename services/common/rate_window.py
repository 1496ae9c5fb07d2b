"""Rate-limit arithmetic: windows, verdicts and OpenAI's ``x-ratelimit-*`` headers. Pure: no I/O.

Requests and tokens are counted in fixed one-minute windows (the epoch minute, the same on
every edge up to clock skew). Concurrent streams are counted in lease epochs: a running stream
is counted in the epoch it started in and renewed into each next epoch while it runs, so the
count of an edge that crashed without releasing its streams is forgotten after one epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

WINDOW_SECONDS = 60
# Length of a concurrent-stream lease epoch, and how long before its end running streams are renewed.
LEASE_EPOCH_SECONDS = 30.0
LEASE_RENEW_MARGIN = 5.0

REQUESTS = "requests"
TOKENS = "tokens"
STREAMS = "streams"


@dataclass(frozen=True, slots=True)
class RateLimits:
    """One caller's budgets; 0 means unlimited."""

    rpm: int = 0
    tpm: int = 0
    streams: int = 0

    @property
    def enabled(self) -> bool:
        """Any budget is set."""
        return bool(self.rpm or self.tpm or self.streams)

    def overridden(self, rpm: int | None, tpm: int | None, streams: int | None) -> RateLimits:
        """These limits with the non-``None`` overrides (an API key's own limits) applied."""
        return RateLimits(rpm=self.rpm if rpm is None else rpm, tpm=self.tpm if tpm is None else tpm,
                          streams=self.streams if streams is None else streams)


def minute_window(now: float) -> tuple[int, float]:
    """The window ``now`` falls in and the seconds until it resets."""
    window = int(now // WINDOW_SECONDS)
    return window, (window + 1) * WINDOW_SECONDS - now


def lease_epochs(now: float, epoch: float = LEASE_EPOCH_SECONDS, margin: float = LEASE_RENEW_MARGIN) -> list[int]:
    """The epochs a stream starting at ``now`` is counted in: the current one, and the next when it is near."""
    current = int(now // epoch)
    if (current + 1) * epoch - now <= margin:
        return [current, current + 1]
    return [current]


def seconds_to_renewal(now: float, epoch: float = LEASE_EPOCH_SECONDS, margin: float = LEASE_RENEW_MARGIN) -> float:
    """How long until running streams must be counted in the next epoch."""
    renew_at = (int(now // epoch) + 1) * epoch - margin
    return renew_at - now if renew_at > now else renew_at + epoch - now


@dataclass(frozen=True, slots=True)
class RateUsage:
    """What a caller has used: requests this window (this one included), tokens this window, streams now."""

    requests: int = 0
    tokens: int = 0
    streams: int = 0


def verdict(limits: RateLimits, used: RateUsage, *, stream: bool) -> str | None:
    """The budget a new request exceeds (``requests``, ``tokens`` or ``streams``), or ``None`` to admit it."""
    if limits.rpm and used.requests > limits.rpm:
        return REQUESTS
    if limits.tpm and used.tokens >= limits.tpm:
        return TOKENS
    if stream and limits.streams and used.streams > limits.streams:
        return STREAMS
    return None


def _duration(seconds: float) -> str:
    """OpenAI's reset format (``"6m0s"``, ``"17s"``), rounded up to whole seconds."""
    whole = max(1, math.ceil(seconds))
    return f"{whole // 60}m{whole % 60}s" if whole >= 60 else f"{whole}s"


def headers(limits: RateLimits, used: RateUsage, reset: float) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers for the budgets that are set."""
    out: dict[str, str] = {}
    if limits.rpm:
        out["x-ratelimit-limit-requests"] = str(limits.rpm)
        out["x-ratelimit-remaining-requests"] = str(max(0, limits.rpm - used.requests))
        out["x-ratelimit-reset-requests"] = _duration(reset)
    if limits.tpm:
        out["x-ratelimit-limit-tokens"] = str(limits.tpm)
        out["x-ratelimit-remaining-tokens"] = str(max(0, limits.tpm - used.tokens))
        out["x-ratelimit-reset-tokens"] = _duration(reset)
    return out


def retry_after(reason: str, reset: float, default: int) -> int:
    """Seconds to wait: until the window resets for requests and tokens, ``default`` for streams."""
    return max(1, math.ceil(reset)) if reason in (REQUESTS, TOKENS) else default


def rejection_message(reason: str, limits: RateLimits, wait: int) -> str:
    """What a 429 says."""
    budget = {REQUESTS: f"{limits.rpm} requests per minute", TOKENS: f"{limits.tpm} tokens per minute",
              STREAMS: f"{limits.streams} concurrent streams"}[reason]
    return f"rate limit reached: this credential may use {budget}; retry in {wait}s"
