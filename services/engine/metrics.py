"""Prometheus metrics of one engine (registry injected; bounded labels only)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10)
_ITL_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1)


class EngineMetrics:
    """``worker_*`` metrics named after the seed documents."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter("worker_requests", "Requests finished, by outcome", ["model", "outcome"],
                                registry=registry)
        self.latency = Histogram("worker_inference_latency_seconds", "Request latency, accept to last token",
                                 ["model"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.ttft = Histogram("worker_time_to_first_token_seconds", "Accept to first token", ["model"],
                              buckets=_TTFT_BUCKETS, registry=registry)
        self.itl = Histogram("worker_inter_token_latency_seconds", "Mean time between tokens per request",
                             ["model"], buckets=_ITL_BUCKETS, registry=registry)
        self.tokens = Counter("worker_generated_tokens", "Completion tokens generated", ["model"], registry=registry)
        self.prompt_tokens = Counter("worker_prompt_tokens", "Prompt tokens processed", ["model"], registry=registry)
        self.in_flight = Gauge("worker_in_flight_requests", "Requests being generated", registry=registry)
        self.memory = Gauge("worker_memory_used_bytes", "Memory used by the engine (GPU memory on GPU, RSS on CPU)",
                            registry=registry)
        self.models_loaded = Gauge("worker_models_loaded", "Models loaded", registry=registry)
        self.adapters_loaded = Gauge("worker_adapters_loaded", "PEFT adapters loaded", registry=registry)
        self.adapter_loads = Counter("worker_adapter_loads", "PEFT adapters loaded into the model",
                                     registry=registry)
        self.adapter_evictions = Counter("worker_adapter_evictions",
                                         "PEFT adapters unloaded to make room (least recently used, idle)",
                                         registry=registry)
        self.health_checks = Counter("llm_engine_health_checks", "Health checks of the loaded backends, by verdict",
                                     ["health"], registry=registry)
