"""What the edge's handlers share: the config and the live bus-side objects, under typed app keys."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web
from nats.aio.client import Client

from schemas.errors import BusError, ErrorCode
from services.common.worker_table import WorkerTable
from services.edge.auth.authenticator import Authenticator
from services.edge.bus.cache_hits import EdgeCache
from services.edge.config import EdgeConfig
from services.edge.bus.publish import RequestPublisher
from services.edge.bus.idempotency import IdempotencyStore
from services.edge.metrics import EdgeMetrics
from services.edge.auth.rate_limit import RateLimiter
from services.edge.bus.registry_view import RegistryView
from services.edge.bus.replies import ReplyRouter
from services.edge.openai.responses_store import ResponseStore


@dataclass
class Edge:
    """The running edge: set up by the app's cleanup context, read by every handler."""

    config: EdgeConfig
    edge_id: str
    nc: Client
    table: WorkerTable
    router: ReplyRouter
    publisher: RequestPublisher
    accepting: bool = field(default=True)
    # Per-caller budgets counted on the bus; None when rate limiting is off.
    limiter: RateLimiter | None = None
    # Idempotency-Key records (KV llm_idempotency); None when the bucket is not provisioned.
    idempotency: IdempotencyStore | None = None
    # Base models the registry knows (for cold starts); empty without the llm_models bucket.
    registry: RegistryView = field(default_factory=RegistryView)
    # Prompt-cache hits answered here (no queue, scheduler or engine); None when off or the bucket is not provisioned.
    cache: EdgeCache | None = None
    # Stored /v1/responses responses (KV llm_responses); None when the bucket is not provisioned.
    responses: ResponseStore | None = None

    def check_accepting(self) -> None:
        """Refuse new inference requests once shutdown has begun."""
        if not self.accepting:
            raise BusError(ErrorCode.NO_WORKER, "the edge is shutting down; retry on another instance")


CONFIG = web.AppKey("config", EdgeConfig)
METRICS = web.AppKey("metrics", EdgeMetrics)
AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
EDGE = web.AppKey("edge", Edge)
# Wall clock of the per-minute rate budgets (``time.time``; tests pass their own to ``create_app``).
RATE_CLOCK = web.AppKey("rate_clock", object)
