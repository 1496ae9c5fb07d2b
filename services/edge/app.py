"""Building the edge's aiohttp application, and its bus-side setup and teardown."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

import nats.js.errors
import nats.micro
from aiohttp import web
from prometheus_client import CollectorRegistry

from schemas import names
from services.common import bus, bus_permissions
from services.common.api_key_store import ApiKeyStore
from services.common.buckets import optional_kv
from services.common.prompt_cache import PromptCacheReader
from services.common.worker_table import WorkerTable
from services.edge.batch import routes as batch_routes
from services.edge.native import routes as native_routes
from services.edge.openai import routes as openai_routes
from services.edge.system import routes as system_routes
from services.edge.training import routes as training_routes
from services.edge.auth.key_cache import ApiKeyCache
from services.edge.auth.authenticator import Authenticator, auth_middleware
from services.edge.bus.cache_hits import EdgeCache
from services.edge.config import EdgeConfig
from services.edge.http.cors import CorsPolicy, cors_headers, cors_middleware
from services.edge.bus.publish import RequestPublisher
from services.edge.bus.idempotency import IdempotencyStore
from services.edge.metrics import EdgeMetrics
from services.edge.middleware import error_middleware, first_output_metrics, metrics_middleware
from services.edge.bus.queue_gauge import QueueGauge
from services.edge.bus.registry_view import RegistryView
from services.edge.auth.rate_limit import RateLimiter, add_rate_headers
from services.common.rate_window import RateLimits
from services.edge.bus.replies import ReplyRouter
from services.edge.bus.reply_socket import open_reply_socket
from services.edge.state import AUTHENTICATOR, CONFIG, EDGE, METRICS, RATE_CLOCK, Edge
from services.edge.bus.liveness import LivenessWatch
from services.edge.openai.responses_store import ResponseStore

log = logging.getLogger(__name__)

VERSION = "0.1.0"
async def _bus_context(app: web.Application) -> AsyncIterator[None]:
    """Connect, subscribe (reply inbox, heartbeats), bootstrap the worker table; undo it all on cleanup."""
    config = app[CONFIG]
    edge_id = config.edge_id or f"edge-{uuid.uuid4().hex[:12]}"
    inbox = names.identity_inbox(bus_permissions.EDGE)
    router = ReplyRouter(edge_id, inbox, max_buffer=config.max_stream_buffer,
                         on_slow_consumer=app[METRICS].slow_consumers.inc, write_through=config.write_through)
    nc = await bus.connect(config, name=f"{names.MICRO_EDGE} {edge_id}", on_reconnect=router.connection_restored,
                           inbox=inbox)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(bus.drain, nc)
        await router.start(nc)
        stack.push_async_callback(router.stop)
        sock = await open_reply_socket(router, config.reply_socket_dir, edge_id) if config.reply_socket else None
        if sock is not None:
            stack.push_async_callback(sock.stop)
        table = WorkerTable()
        liveness = LivenessWatch(table, router, interval=config.liveness_interval, grace=config.worker_lost_grace,
                                 write_timeout=config.write_timeout)
        await liveness.start(nc, nc.jetstream())
        stack.push_async_callback(liveness.stop)
        gauge = QueueGauge(nc.jetstream())
        gauge.start()
        stack.push_async_callback(gauge.stop)
        failovers = app[METRICS].failovers
        publisher = RequestPublisher(nc, nc.jetstream(), router, publish_timeout=config.publish_timeout,
                                     publish_window=config.publish_retry_window,
                                     queue=gauge.drain, table=table, max_failovers=config.max_failovers,
                                     on_failover=lambda outcome: failovers.labels(outcome).inc())
        publisher.reply_socket = sock.name if sock is not None else ""
        service = await nats.micro.add_service(nc, name=names.MICRO_EDGE, version=VERSION,
                                               description="CY-LLM edge (OpenAI-compatible HTTP)",
                                               metadata={"edge_id": edge_id, "http": f"{config.host}:{config.port}"})
        stack.push_async_callback(service.stop)
        if config.uses_keys:
            await _bind_api_keys(app, nc)
        limiter = await _rate_limiter(app, nc)
        limiter.leases.start()
        stack.push_async_callback(limiter.leases.stop)
        idempotency_kv = await optional_kv(nc.jetstream(), names.IDEMPOTENCY_BUCKET,
                                           "Idempotency-Key relies on JetStream's duplicate window alone")
        registry = RegistryView()
        await registry.start(nc.jetstream())
        stack.push_async_callback(registry.stop)
        cache = await _prompt_cache(app, nc, stack)
        responses_kv = await optional_kv(nc.jetstream(), names.RESPONSES_BUCKET,
                                         "/v1/responses serves only store: false requests")
        app[EDGE] = Edge(config=config, edge_id=edge_id, nc=nc, table=table, router=router, publisher=publisher,
                         limiter=limiter, registry=registry, cache=cache,
                         responses=ResponseStore(responses_kv, config.responses_ttl) if responses_kv else None,
                         idempotency=IdempotencyStore(idempotency_kv) if idempotency_kv is not None else None)
        log.info("edge %s connected to %s", edge_id, config.nats_url)
        yield


async def _prompt_cache(app: web.Application, nc, stack: contextlib.AsyncExitStack) -> EdgeCache | None:
    """The edge's reader of the prompt cache (its mirror's watch stopped by ``stack``); None when off."""
    config = app[CONFIG]
    if not config.cache_enabled:
        return None
    kv = await optional_kv(nc.jetstream(), names.PROMPT_CACHE_BUCKET, "hits are answered by the scheduler only")
    if kv is None:
        return None
    reader = await stack.enter_async_context(PromptCacheReader(nc, kv, mirror_bytes=config.cache_mirror_bytes,
                                                               check_interval=config.cache_mirror_check))
    return EdgeCache(reader, app[METRICS])


async def _bind_api_keys(app: web.Application, nc) -> None:
    """Let the authenticator look API keys up in the provisioned ``llm_api_keys`` bucket."""
    try:
        store = await ApiKeyStore.bind(nc.jetstream())
    except nats.js.errors.BucketNotFoundError:
        raise RuntimeError(f"--auth {app[CONFIG].auth}: KV bucket {names.API_KEYS_BUCKET} does not exist; "
                           "run ./cy infra apply against this NATS server") from None
    app[AUTHENTICATOR].bind_keys(ApiKeyCache(store, app[CONFIG].auth_cache_ttl))


async def _rate_limiter(app: web.Application, nc) -> RateLimiter:
    """The limiter on the ``LLM_RATE`` counters; with budgets configured, the stream must exist."""
    config = app[CONFIG]
    defaults = RateLimits(rpm=config.rate_rpm, tpm=config.rate_tpm, streams=config.rate_streams)
    js = nc.jetstream()
    if defaults.enabled:
        try:
            await js.stream_info(names.RATE_STREAM)
        except nats.js.errors.NotFoundError:
            raise RuntimeError(f"--rate-*: stream {names.RATE_STREAM} does not exist; "
                               "run ./cy infra apply against this NATS server") from None
    return RateLimiter(js, defaults, app[METRICS], timeout=config.publish_timeout, retry_after=config.retry_after,
                       clock=app[RATE_CLOCK])


async def _stop_accepting(app: web.Application) -> None:
    """First step of shutdown (before open streams are waited for): new requests get 503."""
    edge = app.get(EDGE)
    if edge is not None:
        edge.accepting = False


def create_app(config: EdgeConfig, *, registry: CollectorRegistry | None = None,
               rate_clock: Callable[[], float] = time.time) -> web.Application:
    """The edge as an aiohttp application; connecting to NATS happens on startup (``cleanup_ctx``).

    With ``config.auth`` other than ``none``, every route but the open ones (``auth_policy``) needs a
    credential with the right scope. Serve it with ``handler_cancellation=True`` (``server.serve`` and
    aiohttp's ``TestServer`` do), so that a client that disconnects cancels its handler and the request
    is cancelled on the bus; ``server.edge_runner`` also answers what aiohttp's HTTP parser refuses
    (oversized headers, a malformed request) with OpenAI error bodies. ``rate_clock`` is the wall clock
    the per-minute rate budgets are counted on.
    """
    metrics = EdgeMetrics(registry if registry is not None else CollectorRegistry())
    middlewares = [metrics_middleware(metrics), error_middleware(config.retry_after, metrics)]
    cors = CorsPolicy(config.cors_origins) if config.cors_origins else None
    if cors is not None:
        middlewares.insert(0, cors_middleware(cors))  # outermost: a preflight carries no credentials
    authenticator = Authenticator(config) if config.auth != "none" else None
    if authenticator is not None:
        middlewares.append(auth_middleware(authenticator))  # inside error_middleware: 401/403 are OpenAI bodies
    app = web.Application(middlewares=middlewares, client_max_size=config.max_body_bytes)
    app[CONFIG] = config
    if authenticator is not None:
        app[AUTHENTICATOR] = authenticator
    app[METRICS] = metrics
    app[RATE_CLOCK] = rate_clock
    app.cleanup_ctx.append(_bus_context)
    app.on_shutdown.append(_stop_accepting)
    app.on_response_prepare.append(add_rate_headers)
    app.on_response_prepare.append(first_output_metrics(metrics))
    if cors is not None:
        app.on_response_prepare.append(cors_headers(cors))
    for routes in (openai_routes, native_routes, system_routes, training_routes, batch_routes):
        routes.add_routes(app)
    return app
