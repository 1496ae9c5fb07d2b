"""Prometheus metrics of one trainer (registry injected)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common import gc_heap

_STEP_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 60, 120)


class TrainerMetrics:
    """``llm_trainer_*`` metrics: jobs by status, steps, tokens, step time, last loss, checkpoint writes."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.gc_pause = gc_heap.pause_histogram("trainer", registry)
        self.jobs = Counter("llm_trainer_jobs_total", "Jobs that reached a status on this trainer", ["status"],
                            registry=registry)
        self.running = Gauge("llm_trainer_jobs_running", "Jobs running on this trainer", registry=registry)
        self.steps = Counter("llm_trainer_steps_total", "Optimizer steps done", registry=registry)
        self.tokens = Counter("llm_trainer_tokens_trained_total", "Label tokens trained on", registry=registry)
        self.step_time = Histogram("llm_trainer_step_seconds", "Seconds per optimizer step", buckets=_STEP_BUCKETS,
                                   registry=registry)
        # One series per running job (one job per trainer at a time), removed when it ends.
        self.last_loss = Gauge("llm_trainer_last_loss", "Training loss of the last optimizer step", ["job"],
                               registry=registry)
        self.checkpoints = Counter("llm_trainer_checkpoint_writes_total", "Checkpoints written to the object store",
                                   registry=registry)
        self.checkpoint_bytes = Counter("llm_trainer_checkpoint_bytes_total", "Bytes of checkpoints written",
                                        registry=registry)
