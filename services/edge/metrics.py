"""The edge's Prometheus metrics, on an injected registry.

Names follow the house scheme ``llm_edge_<noun>_<unit>`` (the seed's ``gateway_requests_total``
and ``gateway_latency_seconds`` are ``llm_edge_requests_total`` and ``llm_edge_latency_seconds``);
labels are bounded: the route template (never the raw path), the status code, the kind of
stream (``sse``, ``json``, ``websocket``) and a rejection reason from a fixed set.

Time to first token is measured as a client sees it: from the request's arrival (for a
WebSocket, the arrival of the request frame) to the moment its first output goes out: the SSE
headers with the first chunk, the first WebSocket frame, or, for an answer that is not
streamed, the whole JSON body (which is its first byte, so there it equals the latency).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from services.common import gc_heap

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)

# Kinds of answer, the ``kind`` label of the stream metrics.
SSE = "sse"
JSON = "json"
WEBSOCKET = "websocket"

# Where a prompt-cache hit the edge answered came from, the ``source`` label of ``llm_edge_cache_hits_total``.
CACHE_MEMORY = "memory"
CACHE_KV = "kv"
CACHE_SOURCES = (CACHE_MEMORY, CACHE_KV)

# The route label of a request aiohttp's HTTP parser refused before any route was matched.
UNMATCHED = "unmatched"


class EdgeMetrics:
    """Request counts, latency (to the last byte, streams included), time to first token, open
    streams, rejections by reason, and requests in flight."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.gc_pause = gc_heap.pause_histogram("edge", registry)
        self.requests = Counter("llm_edge_requests_total", "HTTP requests answered by the edge",
                                ["route", "status"], registry=registry)
        self.latency = Histogram("llm_edge_latency_seconds", "Time from request arrival to its last byte",
                                 ["route"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.ttft = Histogram("llm_edge_time_to_first_token_seconds",
                              "Time from a generation request's arrival to its first output sent to the client "
                              "(SSE: first chunk; websocket: first frame; json: the whole body)",
                              ["route", "kind"], buckets=_TTFT_BUCKETS, registry=registry)
        self.open_streams = Gauge("llm_edge_open_streams", "SSE responses and WebSockets open now",
                                  ["route", "kind"], registry=registry)
        self.rejected = Counter("llm_edge_rejected_requests_total",
                                "Requests (and WebSocket request frames) the edge refused, by reason",
                                ["reason"], registry=registry)
        self.in_flight = Gauge("llm_edge_in_flight_requests", "HTTP requests being answered now",
                               registry=registry)
        self.rate_limited = Counter("llm_edge_rate_limited_total",
                                    "Requests refused with 429 because a per-caller budget was spent",
                                    ["reason"], registry=registry)
        self.failovers = Counter("llm_edge_failovers_total",
                                 "Requests whose engine was lost: re-dispatched before the first token, migrated "
                                 "mid-stream, or ended because no failover was possible", ["outcome"],
                                 registry=registry)
        self.cache_hits = Counter("llm_edge_cache_hits_total",
                                  "Cacheable requests the edge answered from the prompt cache itself, without the "
                                  "queue or a scheduler, by where the entry came from: its memory mirror or one KV "
                                  "read", ["source"], registry=registry)
        self.cache_misses = Counter("llm_edge_cache_misses_total",
                                    "Cacheable requests the edge did not find in the prompt cache (passed on to the "
                                    "queue, where a scheduler looks again and counts llm_scheduler_cache_*)",
                                    registry=registry)
        self.slow_consumers = Counter("llm_edge_slow_consumers_total",
                                      "Requests (each choice of an n>1 answer is one) cut because their client stopped "
                                      "reading: more events waiting than --max-stream-buffer, or a write stalled for "
                                      "--write-timeout seconds (each is cancelled on the bus)", registry=registry)
        self.batch_lines = Counter("llm_edge_batch_lines_total",
                                   "Batch lines this edge's batch runner recorded, by outcome: ok (answered), err "
                                   "(the endpoint refused it), skip (cancelled or expired before it finished)",
                                   ["outcome"], registry=registry)
        # Both sources exported from the start (at 0), so rules adding them up never see an empty vector.
        self.cache_hit_from = {source: self.cache_hits.labels(source) for source in CACHE_SOURCES}
        # Both labels are bounded (route templates, HTTP statuses), so this stays small.
        self._answered: dict[tuple[str, int], tuple[Counter, Histogram]] = {}

    def observe(self, route: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        children = self._answered.get((route, status))
        if children is None:  # label children resolved once per (route, status): this runs for every request
            children = self._answered[(route, status)] = (self.requests.labels(route, str(status)),
                                                          self.latency.labels(route))
        children[0].inc()
        children[1].observe(seconds)

    def reject(self, reason: str | None) -> None:
        """Count one refused request (``None``: the failure was not a refusal, e.g. an engine crash)."""
        if reason is not None:
            self.rejected.labels(reason).inc()

    def refused_unparsed(self, status: int, reason: str) -> None:
        """Count a request aiohttp's parser refused (no route, no handler, no timing)."""
        self.requests.labels(UNMATCHED, str(status)).inc()
        self.rejected.labels(reason).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
