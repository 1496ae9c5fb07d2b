"""Which lane to take from next, and how many: strict priority over what the scheduler knows.

Pure bookkeeping, no I/O. The scheduler parks no pull request on the server beyond the one
fetch that is waiting for it; it fetches only when it believes a lane holds messages, and
learns that from four sources:

* doorbells: every publish to ``llm.v1.infer.submit.<lane>`` is also seen on a core
  subscription (``ring``), possibly a hair before the stream has stored it;
* the ``num_pending`` JetStream reports with every fetched message, and consumer info
  (``settle``, ``hint``);
* the scheduler's own deferrals: a message handed back with a delay is expected again when
  the delay is over (``expect``);
* suspicion: at start-up, after a bus outage, and when consumer info shows more messages
  awaiting acknowledgement than this replica holds (a dead peer's, due for redelivery), a
  lane is probed once (``suspect``, ``sweep``).

An over-estimate costs one empty fetch (``fetch_wait``, or the shorter ``probe_wait`` for a
probe); an under-estimate would leave a message waiting, so every rule errs high.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.names import LANES_BY_PRIORITY, Lane


@dataclass(frozen=True)
class Take:
    """One planned fetch: up to ``batch`` messages from ``lane``, waiting at most ``wait`` seconds."""

    lane: Lane
    batch: int
    wait: float
    rings_before: int


@dataclass
class _LaneView:
    expected: int = 0
    suspect: bool = True  # unknown until probed (start-up)
    rings: int = 0


class LaneBook:
    """The scheduler's belief about each lane's backlog, and the strict-priority take plan."""

    def __init__(self, *, fetch_wait: float, probe_wait: float, max_batch: int, starvation_limit: int = 0,
                 lanes: tuple[Lane, ...] = LANES_BY_PRIORITY) -> None:
        self._fetch_wait = fetch_wait
        self._probe_wait = probe_wait
        self._max_batch = max_batch
        self._starvation_limit = starvation_limit
        self._order = lanes
        self._lanes = {lane: _LaneView() for lane in lanes}
        # Messages taken from higher lanes while this lane was believed to hold work.
        self._passed_over = {lane: 0 for lane in lanes}

    def plan(self, free: int) -> Take | None:
        """Fetch from the highest lane that may hold work, never more than ``free`` messages.

        Strict priority, except the starvation guard: once ``starvation_limit`` messages (0 = never)
        have been taken from higher lanes while a lower lane waited, that lane gets one message.
        ``None`` when there is no free capacity or every lane is believed empty.
        """
        if free <= 0:
            return None
        waiting = [lane for lane in self._order if self._lanes[lane].expected > 0 or self._lanes[lane].suspect]
        if not waiting:
            return None
        chosen, batch = waiting[0], None
        if self._starvation_limit:
            starved = [lane for lane in waiting[1:] if self._passed_over[lane] >= self._starvation_limit]
            if starved:
                chosen, batch = starved[0], 1
        view = self._lanes[chosen]
        if view.expected > 0:
            take = Take(chosen, batch or min(view.expected, free, self._max_batch), self._fetch_wait, view.rings)
        else:
            take = Take(chosen, 1, self._probe_wait, view.rings)
        self._account(take, waiting)
        return take

    def _account(self, take: Take, waiting: list[Lane]) -> None:
        self._passed_over[take.lane] = 0
        below = False
        for lane in waiting:
            if lane == take.lane:
                below = True
            elif below and self._lanes[lane].expected > 0:
                self._passed_over[lane] += take.batch

    def ring(self, lane: Lane) -> None:
        """A message was published to ``lane`` (it may not be stored yet)."""
        view = self._lanes[lane]
        view.rings += 1
        view.expected += 1

    def settle(self, take: Take, got: int, num_pending: int = 0, redelivered: bool = False) -> None:
        """Record a fetch's result: ``got`` messages, the last with ``num_pending`` / ``redelivered``.

        Doorbells that rang while the fetch was out may or may not be counted in
        ``num_pending``, so they are added on top; rung messages not taken stay expected.
        """
        view = self._lanes[take.lane]
        rang_meanwhile = view.rings - take.rings_before
        if got:
            # The fetch asks the stream without waiting first, so messages whose doorbells rang
            # before the plan but which the stream had not stored yet came back neither as
            # messages nor in ``num_pending``. Keep expecting every rung message not taken: the
            # next fetch waits up to ``fetch_wait`` for them (an empty one, if a peer took them).
            view.expected = max(num_pending + rang_meanwhile, view.expected - got)
            # Redeliveries are served first and are not in num_pending: a full batch of them may hide more.
            view.suspect = got >= take.batch and redelivered
        else:
            view.expected = rang_meanwhile
            view.suspect = False

    def expect(self, lane: Lane) -> None:
        """A message handed back to ``lane`` (a deferred one) is due for redelivery now."""
        self._lanes[lane].expected += 1

    def suspect(self, lane: Lane) -> None:
        """``lane`` may hold messages nothing told us about (redeliveries): probe it once."""
        self._lanes[lane].suspect = True

    def sweep(self) -> None:
        """Probe every lane once (what was known is stale, e.g. after a bus outage)."""
        for view in self._lanes.values():
            view.suspect = True

    def hint(self, lane: Lane, num_pending: int) -> bool:
        """Raise the estimate to an authoritative ``num_pending`` (consumer info); True if it rose."""
        view = self._lanes[lane]
        if num_pending > view.expected:
            view.expected = num_pending
            return True
        return False

    def expected(self, lane: Lane) -> int:
        """Messages currently believed to wait in ``lane``."""
        return self._lanes[lane].expected
