"""Which offers run on this engine, and the tombstones that keep a late read from running one. Pure.

A request reaches an engine as an offer (``InferenceRequest.dispatch`` numbers them). Cancels leave
tombstones, so that a late read of a dispatch never runs it: an id cancelled on
``llm.v1.infer.cancel``, or one offer of it withdrawn on ``llm.v1.engine.<worker>.cancel`` (the
scheduler stopped waiting for this engine's answer), is refused if its dispatch is only read
afterwards, for as long as a redelivered message could still arrive. A withdrawn offer that is
already running is *silenced*: it stops without a terminal event, because its reply subject
belongs to the engine the request was offered to next. An offer the engine itself gave up on
(failed health, a stall) is *ending*: it stops with ``engine_failed`` and no more tokens.
"""

from __future__ import annotations

from schemas.errors import ErrorCode
from schemas.inference import InferenceRequest
from services.common.recent import RecentIds

# Longer than the inference consumers' ack_wait: a message redelivered after a scheduler died
# between the engine's accept and its ack arrives within it.
FINISHED_TTL = 300.0


def offer_key(request_id: str, dispatch: int) -> str:
    """The tombstone of one offer (``InferenceRequest.dispatch``) of a request."""
    return f"{request_id}#{dispatch}"


class OfferBook:
    """Running offers by request id, plus the ids recently finished, cancelled and withdrawn here."""

    def __init__(self, ttl: float = FINISHED_TTL) -> None:
        self.finished = RecentIds(ttl)  # a redelivered copy of these must not run again (see ``probe``)
        self._cancelled = RecentIds(ttl)
        self._withdrawn = RecentIds(ttl)
        self._offer_of: dict[str, int] = {}  # running id -> the ``dispatch`` number it runs under
        self.silenced: set[str] = set()  # running ids whose offer was withdrawn: they publish nothing more
        self.ending: dict[str, str] = {}  # running ids the engine gave up on (failed, stalled) -> why

    def refusal(self, req: InferenceRequest, worker: str) -> tuple[str, str] | None:
        """Why ``req``'s offer must not run here because of a tombstone (error code, message), or ``None``."""
        if req.id in self._cancelled or offer_key(req.id, req.dispatch) in self._withdrawn:
            return ErrorCode.CANCELLED, f"request {req.id} was cancelled or withdrawn from {worker}"
        if req.id in self.silenced:  # an older, withdrawn offer of it is still stopping here
            return ErrorCode.ENGINE_BUSY, "an earlier offer of this request is still stopping"
        return None

    def begin(self, req: InferenceRequest) -> None:
        """``req``'s offer starts running here."""
        self._offer_of[req.id] = req.dispatch

    def cancel(self, request_id: str) -> None:
        """``request_id`` was cancelled: a dispatch of it read after this is refused."""
        self._cancelled.add(request_id)

    def withdraw(self, request_id: str, dispatch: int) -> bool:
        """Offer ``dispatch`` of ``request_id`` was withdrawn; ``True`` when that offer is the one running
        here, which is then silenced (the caller stops it)."""
        self._withdrawn.add(offer_key(request_id, dispatch))
        if self._offer_of.get(request_id) != dispatch:
            return False
        self.silenced.add(request_id)
        return True

    def give_up(self, request_id: str, reason: str) -> bool:
        """Mark a running offer as ending for ``reason``; ``False`` if it was already ending or silenced."""
        if request_id in self.ending or request_id in self.silenced:
            return False
        self.ending[request_id] = reason
        return True

    def end(self, request_id: str) -> None:
        """The offer of ``request_id`` stopped and published its last event (or, silenced, none)."""
        self.silenced.discard(request_id)
        self._offer_of.pop(request_id, None)
        self.ending.pop(request_id, None)
        self.finished.add(request_id)
