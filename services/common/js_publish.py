"""JetStream publishes that ride through a stream leader election (a lost NATS node).

On a cluster, a stream has no leader for a few seconds after its leader's node dies: a publish
then gets no answer (the stream's subject has no responder) or times out (it reached the dying
leader). Both are retried here with the same ``Nats-Msg-Id``, so the stream keeps one copy even
if an attempt that looked lost was stored: JetStream answers the later copy ``duplicate``
inside the stream's duplicate window. The caller sees one acknowledgement, or the last error
once ``window`` has passed. ``through_elections`` does the same for any operation that is safe
to run twice (a read, a KV put, an object-store put of the same bytes).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext, api

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# What a publish meets while a stream elects a leader or the client moves to another node:
# no responder on the stream subject, a lost answer, a connection between servers, and the
# 503 with 10008 ("JetStream system temporarily unavailable"). Other 503s (10077, a full
# stream) are answers, not elections.
RETRYABLE = (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError,
             nats.errors.ConnectionReconnectingError, nats.js.errors.ServiceUnavailableError)
_TEMPORARILY_UNAVAILABLE = 10008


def _retryable(exc: Exception) -> bool:
    if isinstance(exc, nats.js.errors.APIError):
        return exc.err_code == _TEMPORARILY_UNAVAILABLE
    return True


def election_error(exc: BaseException) -> bool:
    """A failure a leader election or a change of node causes (worth retrying), not an answer."""
    return isinstance(exc, RETRYABLE) and _retryable(exc)


_FIRST_BACKOFF = 0.1
_FIRST_ATTEMPT_WAIT = 0.5
_MAX_BACKOFF = 1.0
_ELECTION_PAUSE = 0.5


async def through_elections(op: Callable[[], Awaitable[_T]], *, window: float, what: str) -> _T:
    """``await op()``, run again while a leader election or a change of node makes it fail, for up to ``window`` s.

    Only for operations that may run twice (a read, a put of the same value): an attempt that
    timed out may have been applied. Any other error, and the last election error after
    ``window``, is raised.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + window
    attempt = 0
    while True:
        attempt += 1
        try:
            return await op()
        except RETRYABLE as exc:
            if not _retryable(exc) or loop.time() + _ELECTION_PAUSE >= deadline:
                raise
            log.warning("%s met a leader election (%s, attempt %d); retrying", what, type(exc).__name__, attempt)
        await asyncio.sleep(_ELECTION_PAUSE)


@dataclass(frozen=True)
class Published:
    """A stored publication: JetStream's ack and how many attempts it took."""

    ack: api.PubAck
    attempts: int

    @property
    def ours(self) -> bool:
        """Not a copy of someone else's message: stored now, or a duplicate of an earlier attempt of ours."""
        return not self.ack.duplicate or self.attempts > 1


async def publish(js: JetStreamContext, subject: str, payload: bytes, *, msg_id: str, timeout: float,
                  window: float, headers: dict[str, str] | None = None, nc: Client | None = None) -> Published:
    """Publish with ``Nats-Msg-Id: msg_id``, retrying what a leader election causes for up to ``window`` s.

    Attempts wait for their ack 0.5 s, then twice as long each time up to ``timeout``: a publish
    that reached a leader as it died gets no answer at all, and the sooner it is sent again, the
    sooner the new leader stores it (a healthy but slow server costs a few deduplicated copies).
    Anything else (a full stream, a payload too
    big, a closed connection) is raised at once, as is the last retryable error after ``window``.
    Given ``nc``, a client cut off from every server for ``timeout`` s stops retrying: that is an
    outage, not an election (moving to another node of a cluster takes well under a second).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(window, timeout)
    all_headers = {**(headers or {}), "Nats-Msg-Id": msg_id}
    backoff, attempt, patience = _FIRST_BACKOFF, 0, min(_FIRST_ATTEMPT_WAIT, timeout)
    offline_since: float | None = None
    while True:
        attempt += 1
        wait = min(patience, max(deadline - loop.time(), 0.05))
        patience = min(patience * 2, timeout)
        try:
            ack = await js.publish(subject, payload, timeout=wait, headers=all_headers)
        except RETRYABLE as exc:
            now = loop.time()
            offline = nc is not None and not nc.is_connected
            offline_since = (offline_since or now) if offline else None
            if (not _retryable(exc) or now + backoff >= deadline
                    or (offline_since is not None and now - offline_since >= timeout)):
                raise
            log.info("publish %s to %s: %s (attempt %d); retrying with the same Nats-Msg-Id", msg_id, subject,
                     type(exc).__name__, attempt)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF)
            continue
        if attempt > 1:
            log.info("publish %s to %s stored after %d attempts%s", msg_id, subject, attempt,
                     " (an earlier one had been stored)" if ack.duplicate else "")
        return Published(ack, attempt)
