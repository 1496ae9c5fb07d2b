"""Prometheus metrics of one scheduler replica (registry injected; bounded labels only).

Named ``llm_scheduler_*`` (the seed documents' ``coordinator_*``; docs/observability.md maps the
old names). Failover is decided by the edge (it alone knows what the client was sent, see
``services.edge.bus.failover``), so the edge's ``llm_edge_failovers_total{outcome}`` counts the decisions; each scheduler replica
counts the failover attempts it dispatched (``llm_scheduler_failover_dispatches_total{kind}``), its
own retries of a dispatch on another engine (``llm_scheduler_dispatch_retries_total``) and every
known engine's circuit-breaker state (``llm_scheduler_circuit_state{worker,state}``, 1 for the
current state, read from the breakers at scrape time). Requests of NATS-native producers (which
the edge does not watch) whose engine died are ended by the scheduler with ``worker_lost`` and
counted in ``llm_scheduler_worker_lost_requests_total``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from schemas.names import LANES_BY_PRIORITY, Lane
from services.common import gc_heap
from services.scheduler.circuit import CircuitState

_DISPATCH_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Outcome(enum.StrEnum):
    """What happened to one message taken from the queue (the ``outcome`` label)."""

    DISPATCHED = "dispatched"        # an engine accepted it
    DEFERRED = "deferred"            # no engine could take it now; back to the queue for later
    DUPLICATE = "duplicate"          # already accepted earlier (redelivery); acknowledged, not re-sent
    CANCELLED = "cancelled"          # cancelled while queued
    EXPIRED = "expired"              # deadline passed before dispatch: timeout error sent
    MODEL_NOT_FOUND = "model_not_found"  # no live engine serves the model: error sent
    REFUSED = "refused"              # an engine refused the request itself: its error sent
    CACHED = "cached"                # answered from the prompt cache, no engine involved
    INVALID = "invalid"              # not a valid InferenceRequest (or a keyed one of an unknown key): terminated
    RATE_LIMITED = "rate_limited"    # a keyed (NATS-native) request over its API key's limits: error sent


class Attempt(enum.StrEnum):
    """How one send to one engine went (the ``result`` label)."""

    ACCEPTED = "accepted"
    BUSY = "busy"
    REFUSED = "refused"
    NO_REPLY = "no_reply"


class FailoverKind(enum.StrEnum):
    """What a failover attempt re-published by the edge asks for (the ``kind`` label)."""

    REDISPATCH = "redispatch"  # the engine was lost before any token reached the client: the same request
    MIGRATION = "migration"    # lost mid-stream: the prompt plus the text so far, the remaining budget


class CircuitStates(Collector):
    """``llm_scheduler_circuit_state{worker,state}``: 1 for each engine's breaker state now, 0 for the others.

    Collected at scrape time because a breaker half-opens by the clock, not by an event.
    """

    NAME = "llm_scheduler_circuit_state"

    def __init__(self, states: Callable[[], Mapping[str, CircuitState]]) -> None:
        self._states = states

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self.NAME, "Circuit-breaker state of each engine (1 = current state)",
                                 labels=["worker", "state"])

    def describe(self) -> Iterator[Metric]:
        """The family without samples (registration checks names only)."""
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        """One sample per engine and state."""
        family = self._family()
        for _ in range(3):
            try:
                states = self._states()
                break
            except RuntimeError:  # the exporter scrapes on its own thread: the table changed while read
                continue
        else:
            states = {}
        for worker, current in sorted(states.items()):
            for state in CircuitState:
                family.add_metric([worker, state.value], 1.0 if state is current else 0.0)
        yield family


class SchedulerMetrics:
    """Every metric of the scheduler, registered on the injected ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.gc_pause = gc_heap.pause_histogram("scheduler", registry)
        self.requests = Counter("llm_scheduler_inference_requests_total",
                                "Messages taken from the queue, by outcome", ["lane", "outcome"], registry=registry)
        self.queue_pending = Gauge("llm_scheduler_queue_pending", "Messages waiting in a lane of the queue",
                                   ["lane"], registry=registry)
        self.workers_healthy = Gauge("llm_scheduler_workers_healthy", "Live, non-draining engines",
                                     registry=registry)
        self.dispatch_latency = Histogram("llm_scheduler_dispatch_latency_seconds",
                                          "Taken from the queue to accepted by an engine", ["lane"],
                                          buckets=_DISPATCH_BUCKETS, registry=registry)
        self.queue_wait = Histogram("llm_scheduler_queue_wait_seconds",
                                    "Request created (producer clock) to accepted by an engine", ["lane"],
                                    buckets=_WAIT_BUCKETS, registry=registry)
        self.attempts = Counter("llm_scheduler_dispatch_attempts_total", "Sends to an engine, by result", ["result"],
                                registry=registry)
        # The scheduler's view only: hits the edge answers itself never reach it (llm_edge_cache_hits_total).
        self.cache_hits = Counter("llm_scheduler_cache_hits_total",
                                  "Cacheable requests this scheduler answered from the prompt cache (hits answered "
                                  "by the edge are in llm_edge_cache_hits_total)", registry=registry)
        self.cache_misses = Counter("llm_scheduler_cache_misses_total",
                                    "Cacheable requests not found in the prompt cache", registry=registry)
        self.cache_local_hits = Counter("llm_scheduler_cache_local_hits_total",
                                        "Prompt-cache hits served from this replica's memory (no KV read); included "
                                        "in llm_scheduler_cache_hits_total", registry=registry)
        self.cache_hit_rate = Gauge("llm_scheduler_cache_hit_ratio",
                                    "Hits over the cacheable lookups this scheduler made since start (not counting "
                                    "hits the edge answered itself)", registry=registry)
        self.circuits_open = Gauge("llm_scheduler_circuits_open",
                                   "Engines whose circuit breaker is open or half-open", registry=registry)
        self.retries = Counter("llm_scheduler_dispatch_retries_total",
                               "Dispatches offered to another engine after one answered busy or did not answer",
                               registry=registry)
        self.failover_dispatches = Counter("llm_scheduler_failover_dispatches_total",
                                           "Failover attempts (re-published by the edge after losing an engine) "
                                           "accepted by an engine, by kind", ["kind"], registry=registry)
        self.worker_lost = Counter("llm_scheduler_worker_lost_requests_total",
                                   "Requests of NATS-native producers ended with worker_lost because the engine "
                                   "running them stopped heart-beating (edge requests are failed over by the edge)",
                                   registry=registry)
        self._hits = 0
        self._lookups = 0
        # Label children resolved once: these are touched for every request.
        self._pending = {lane: self.queue_pending.labels(lane.value) for lane in LANES_BY_PRIORITY}
        self._latency = {lane: self.dispatch_latency.labels(lane.value) for lane in LANES_BY_PRIORITY}
        self._wait = {lane: self.queue_wait.labels(lane.value) for lane in LANES_BY_PRIORITY}
        self._outcomes = {(lane, o): self.requests.labels(lane.value, o.value)
                          for lane in LANES_BY_PRIORITY for o in Outcome}
        self._attempts = {a: self.attempts.labels(a.value) for a in Attempt}
        self._failovers = {k: self.failover_dispatches.labels(k.value) for k in FailoverKind}

    def watch_circuits(self, states: Callable[[], Mapping[str, CircuitState]]) -> None:
        """Export ``states()`` (engine -> breaker state) as ``llm_scheduler_circuit_state`` at every scrape."""
        self.registry.register(CircuitStates(states))

    def outcome(self, lane: Lane, outcome: Outcome) -> None:
        """Count one message of ``lane`` ending with ``outcome``."""
        self._outcomes[(lane, outcome)].inc()

    def attempt(self, result: Attempt) -> None:
        """Count one send to an engine."""
        self._attempts[result].inc()

    def cache_lookup(self, hit: bool, *, local: bool = False) -> None:
        """Count one prompt-cache lookup (``local``: a hit from memory) and update the hit rate."""
        self._lookups += 1
        if hit:
            self._hits += 1
            self.cache_hits.inc()
            if local:
                self.cache_local_hits.inc()
        else:
            self.cache_misses.inc()
        self.cache_hit_rate.set(self._hits / self._lookups)

    def retry(self) -> None:
        """Count one dispatch re-offered to another engine."""
        self.retries.inc()

    def dispatched(self, lane: Lane, taken_for: float, queued_for: float | None,
                   failover: FailoverKind | None = None) -> None:
        """Record the latencies of one accepted dispatch (seconds), and whether it was a failover attempt."""
        self._latency[lane].observe(taken_for)
        if failover is not None:
            self._failovers[failover].inc()
        if queued_for is not None and queued_for >= 0:
            self._wait[lane].observe(queued_for)

    def pending(self, lane: Lane, count: int) -> None:
        """Set the number of messages waiting in ``lane``."""
        self._pending[lane].set(count)

    def request_counts(self) -> dict[str, dict[str, int]]:
        """Messages by lane and outcome so far (non-zero ones), for the status endpoint."""
        out: dict[str, dict[str, int]] = {}
        for metric in self.requests.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.value:
                    out.setdefault(sample.labels["lane"], {})[sample.labels["outcome"]] = int(sample.value)
        return out
