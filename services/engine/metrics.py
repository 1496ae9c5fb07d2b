"""Prometheus metrics of one engine (registry injected; bounded labels only)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common import gc_heap
from services.engine.backend import JoinStats, PrefixCacheStats

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10)
_ITL_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1)
_COMPILE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class EngineMetrics:
    """``llm_engine_*`` metrics: requests by outcome, latency, time to first token, inter-token latency,
    tokens, requests in flight, memory, the models and PEFT adapters loaded, and prompt-prefix KV
    reuse (the seed documents called these ``worker_*``; docs/observability.md maps the old names)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.gc_pause = gc_heap.pause_histogram("engine", registry)
        self.requests = Counter("llm_engine_requests_total", "Requests finished, by outcome", ["model", "outcome"],
                                registry=registry)
        self.latency = Histogram("llm_engine_inference_latency_seconds", "Request latency, accept to last token",
                                 ["model"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.ttft = Histogram("llm_engine_time_to_first_token_seconds", "Accept to first token", ["model"],
                              buckets=_TTFT_BUCKETS, registry=registry)
        self.itl = Histogram("llm_engine_inter_token_latency_seconds", "Mean time between tokens per request",
                             ["model"], buckets=_ITL_BUCKETS, registry=registry)
        self.tokens = Counter("llm_engine_generated_tokens_total", "Completion tokens generated", ["model"],
                              registry=registry)
        self.prompt_tokens = Counter("llm_engine_prompt_tokens_total", "Prompt tokens processed", ["model"],
                                     registry=registry)
        self.in_flight = Gauge("llm_engine_in_flight_requests", "Requests being generated", registry=registry)
        self.memory = Gauge("llm_engine_memory_used_bytes",
                            "Memory used by the engine (GPU memory on GPU, RSS on CPU)", registry=registry)
        self.models_loaded = Gauge("llm_engine_models_loaded", "Models loaded", registry=registry)
        self.adapters_loaded = Gauge("llm_engine_adapters_loaded", "PEFT adapters loaded", registry=registry)
        self.adapter_loads = Counter("llm_engine_adapter_loads_total", "PEFT adapters loaded into the model",
                                     registry=registry)
        self.grammar_compile = Histogram("llm_engine_grammar_compile_seconds",
                                         "Compiling a structured-output constraint (cache misses only)",
                                         buckets=_COMPILE_BUCKETS, registry=registry)
        self.adapter_evictions = Counter("llm_engine_adapter_evictions_total",
                                         "PEFT adapters unloaded to make room (least recently used, idle)",
                                         registry=registry)
        self.health_checks = Counter("llm_engine_health_checks_total", "Health checks of the loaded backends, by verdict",
                                     ["health"], registry=registry)
        self.prefix_hits = Counter("llm_engine_prefix_cache_hits_total",
                                   "Prompts that reused a cached prompt prefix's KV", registry=registry)
        self.prefix_misses = Counter("llm_engine_prefix_cache_misses_total",
                                     "Prompts long enough to reuse a prefix that found none", registry=registry)
        self.prefix_tokens = Counter("llm_engine_prefix_cache_reused_tokens_total",
                                     "Prompt tokens whose KV was reused instead of prefilled", registry=registry)
        self.prefix_bytes = Gauge("llm_engine_prefix_cache_bytes", "Prompt-prefix KV held for reuse",
                                  registry=registry)
        self._prefix_seen = PrefixCacheStats()
        self.join_holds = Counter("llm_engine_join_holds_total",
                                  "Decode steps held for the requests replacing those just finished (join window)",
                                  registry=registry)
        self.join_requests = Counter("llm_engine_join_requests_total",
                                     "Requests that arrived during a hold and started in the next step",
                                     registry=registry)
        self.join_seconds = Counter("llm_engine_join_hold_seconds_total", "Time decode steps were held",
                                    registry=registry)
        self._joins_seen = JoinStats()

    def observe_finished(self, model: str, start: float, first: float, usage) -> None:
        """A request on ``model`` finished: its latency since ``start`` (monotonic), time to its ``first``
        token (0: none) and mean inter-token latency, and its tokens (``usage``: ``schemas.events.Usage``)."""
        now = time.monotonic()
        self.latency.labels(model).observe(now - start)
        self.tokens.labels(model).inc(usage.completion_tokens)
        self.prompt_tokens.labels(model).inc(usage.prompt_tokens)
        if first:
            self.ttft.labels(model).observe(first - start)
            if usage.completion_tokens > 1:
                self.itl.labels(model).observe((now - first) / (usage.completion_tokens - 1))

    def observe_prefix_cache(self, stats: PrefixCacheStats) -> None:
        """Advance the prefix-cache counters to the backends' totals (sampled each heartbeat interval).

        A total below the last one means a model was unloaded (its counts went with it): the counters
        then advance by the new model's counts alone, and never go back.
        """
        seen = self._prefix_seen
        _advance((self.prefix_hits, stats.hits, seen.hits), (self.prefix_misses, stats.misses, seen.misses),
                 (self.prefix_tokens, stats.reused_tokens, seen.reused_tokens))
        self.prefix_bytes.set(stats.nbytes)
        self._prefix_seen = stats  # a fresh total each time (``ModelHost.prefix_cache_stats``)

    def observe_joins(self, stats: JoinStats) -> None:
        """Advance the join-window counters to the backends' totals (as ``observe_prefix_cache``)."""
        seen = self._joins_seen
        _advance((self.join_holds, stats.holds, seen.holds), (self.join_requests, stats.joined, seen.joined),
                 (self.join_seconds, stats.held_seconds, seen.held_seconds))
        self._joins_seen = stats

    def observe_adapters(self, loaded: int, change) -> None:
        """The engine loaded or evicted PEFT adapters (``change``: ``backend.AdapterChange``); ``loaded`` now."""
        self.adapters_loaded.set(loaded)
        self.adapter_loads.inc(change.loads)
        self.adapter_evictions.inc(change.evictions)


def _advance(*counters: tuple[Counter, float, float]) -> None:
    """Each ``(counter, total now, total last seen)``: the counter advanced by the difference, or by the new total
    when it went down (a model was unloaded and its counts went with it); a counter never goes back."""
    for counter, now, before in counters:
        counter.inc(now - before if now >= before else now)
