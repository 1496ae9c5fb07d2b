"""API keys' NATS-native requests held to the key's limits, as the edge holds HTTP requests.

A producer with an API key's NATS user (``./cy keys create --nats``) may publish only to
``llm.v1.infer.keyed.<its key id>.<lane>`` (stream ``LLM_INFER_KEYED``): the subject names the key
the server authenticated, whatever the message says. Every scheduler replica takes from the shared
durable ``schedulers_keyed`` and, for each request:

- looks the key up in ``llm_api_keys``: unknown or revoked, the producer gets ``invalid_api_key``;
- counts one request in this minute of the key's budget and reads its tokens, in the same
  ``LLM_RATE`` counters the edge counts the key's HTTP requests in, so both paths share one budget;
- over a limit: a typed ``rate_limit_exceeded`` ``StreamError`` on the request's reply subject (the
  request is not run, and its count is taken back);
- within: the request goes into its lane of the inference queue (``Nats-Msg-Id`` = its id, so an
  admission redelivered after a crash does not queue it twice) with ``rate_caller`` set, and the
  engine charges its tokens to the key when it ends.

Concurrent-stream limits are the edge's alone (nothing on the bus sees a producer stop reading).
If the counters cannot be reached, requests are admitted and a warning logged, as on the edge.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from schemas import names
from schemas.auth import ApiKeyRecord
from schemas.errors import ErrorCode
from schemas.events import StreamError, encode
from services.common import js_publish, rate_window
from services.common.api_key_store import ApiKeyStore
from services.common.bus import BUS_DOWN
from services.common.lifecycle import cancel_and_wait
from services.common.rate_counters import CounterStore, caller_of_key
from services.common.rate_window import RateLimits
from services.scheduler.metrics import Outcome, SchedulerMetrics
from services.scheduler.triage import Malformed, classify

log = logging.getLogger(__name__)

# Most keyed requests taken in one fetch, and how long a fetch waits for the first one.
BATCH = 16
FETCH_WAIT = 1.0
# A request the queue could not take (full, or no answer) is offered to admission again after this long.
REQUEUE_DELAY = 1.0
COUNTER_TIMEOUT = 2.0


class KeyAdmission:
    """Moves admitted keyed requests into the inference queue; answers the others with a typed error."""

    def __init__(self, nc: Client, js: JetStreamContext, defaults: RateLimits, metrics: SchedulerMetrics, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._nc = nc
        self._js = js
        self._defaults = defaults
        self._clock = clock
        self._counters = CounterStore(js, timeout=COUNTER_TIMEOUT)
        self._metrics = metrics
        self._keys: ApiKeyStore | None = None
        self._psub: JetStreamContext.PullSubscription | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind the provisioned durable and the key store; take requests until ``stop``."""
        self._keys = await ApiKeyStore.bind(self._js)
        self._psub = await self._js.pull_subscribe_bind(durable=names.KEYED_DURABLE, stream=names.INFER_KEYED_STREAM)
        self._task = asyncio.create_task(self._run(), name="scheduler-key-admission")

    async def stop(self) -> None:
        """Stop taking requests (one being admitted is redelivered to another replica)."""
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        if self._psub is not None:
            await self._psub.unsubscribe()
            self._psub = None

    async def _run(self) -> None:
        assert self._psub is not None
        while True:
            try:
                msgs = await self._psub.fetch(BATCH, timeout=FETCH_WAIT)
            except nats.errors.TimeoutError:
                continue
            except BUS_DOWN:
                await asyncio.sleep(FETCH_WAIT)
                continue
            for msg in msgs:
                await self.admit(msg)

    async def admit(self, msg: Msg) -> None:
        """Admit, refuse or hand back one keyed request; settle its message."""
        try:
            key_id, lane = names.keyed_parts(msg.subject)
        except ValueError:  # the stream takes only keyed subjects; anything else is not ours to run
            await msg.term()
            return
        verdict = classify(msg.data, now=self._clock(), cancelled=(), accepted=(), dispatching=())
        if isinstance(verdict, Malformed):
            await self._refuse(msg, lane, verdict.request_id, verdict.reply_to, ErrorCode.INVALID_REQUEST,
                               verdict.reason)
            return
        req = verdict.request
        record = await self._key(key_id)
        if record is None or record.revoked:
            await self._refuse(msg, lane, req.id, req.reply_to, ErrorCode.INVALID_API_KEY,
                               f"API key {key_id} is {'revoked' if record else 'unknown'}")
            return
        caller = caller_of_key(key_id)
        limits = self._defaults.overridden(record.rate_rpm, record.rate_tpm, None)
        window, reset = rate_window.minute_window(self._clock())
        requests_subject = names.rate_counter(caller, rate_window.REQUESTS, window)
        requests, tokens = await asyncio.gather(
            self._counters.add_or_admit(requests_subject, 1) if limits.rpm else _zero(),
            self._counters.total_or_admit(names.rate_counter(caller, rate_window.TOKENS, window)) if limits.tpm else _zero())
        reason = rate_window.verdict(limits, rate_window.RateUsage(requests=requests, tokens=tokens), stream=False)
        if reason is not None:
            if limits.rpm:
                await self._counters.add_or_admit(requests_subject, -1)  # not served: it spends nothing
            wait = rate_window.retry_after(reason, reset, 1)
            await self._refuse(msg, lane, req.id, req.reply_to, ErrorCode.RATE_LIMITED,
                               rate_window.rejection_message(reason, limits, wait))
            return
        # A key's producer names no reply socket: an engine would write its events to another producer's socket.
        queued = msgspec.structs.replace(req, rate_caller=caller, reply_socket="")
        try:
            await js_publish.publish(self._js, names.infer_submit(lane), encode(queued), msg_id=req.id,
                                     timeout=COUNTER_TIMEOUT, window=10.0, nc=self._nc)
        except (nats.errors.Error, TimeoutError) as exc:  # a full queue (10077) or no JetStream: try again later
            log.warning("keyed request %s could not join the %s queue (%s); retrying", req.id, lane, exc)
            if limits.rpm:
                await self._counters.add_or_admit(requests_subject, -1)
            await msg.nak(delay=REQUEUE_DELAY)
            return
        await msg.ack()

    async def _key(self, key_id: str) -> ApiKeyRecord | None:
        assert self._keys is not None
        return await self._keys.get(key_id)

    async def _refuse(self, msg: Msg, lane: names.Lane, request_id: str, reply_to: str | None, code: ErrorCode,
                      message: str) -> None:
        """Answer ``code`` on the request's reply subject and settle it (it is never run)."""
        if reply_to:
            try:
                await self._nc.publish(reply_to, encode(StreamError(id=request_id, code=str(code), message=message)))
            except BUS_DOWN as exc:
                log.warning("could not send %s to keyed request %s: %s", code, request_id, exc)
        await msg.ack()
        self._metrics.outcome(lane, Outcome.RATE_LIMITED if code == ErrorCode.RATE_LIMITED else Outcome.INVALID)


async def _zero() -> int:
    return 0
