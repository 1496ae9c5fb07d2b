"""The edge's Prometheus metrics, on an injected registry.

Names follow the seed's promise (``gateway_requests_total``, ``gateway_latency_seconds``);
labels are bounded: the route template (never the raw path) and the status code.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class EdgeMetrics:
    """Request counts, latency (to the last byte, streams included) and requests in flight."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter("gateway_requests_total", "HTTP requests answered by the edge",
                                ["route", "status"], registry=registry)
        self.latency = Histogram("gateway_latency_seconds", "Time from request arrival to its last byte",
                                 ["route"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.in_flight = Gauge("gateway_in_flight_requests", "HTTP requests being answered now",
                               registry=registry)
        self.rate_limited = Counter("llm_edge_rate_limited_total",
                                    "Requests refused with 429 because a per-caller budget was spent",
                                    ["reason"], registry=registry)
        self.failovers = Counter("llm_edge_failovers_total",
                                 "Requests whose engine was lost: re-dispatched before the first token, migrated "
                                 "mid-stream, or ended because no failover was possible", ["outcome"],
                                 registry=registry)

    def observe(self, route: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
