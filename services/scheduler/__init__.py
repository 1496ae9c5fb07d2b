"""The scheduler: takes inference requests off JetStream by priority lane and offers them to engines.

Pure logic, no I/O: ``triage`` (what to do with one message), ``lanes`` (which lane to take
from, how many), ``strategies`` (the routing strategies: which engine), ``placement`` (capacity
net of this replica's unanswered offers, plus routing state), ``circuit`` (per-engine circuit
breakers), ``prefix_index`` and ``response_times`` (what ``prefix_affinity`` and
``response_time`` learn), ``running`` (accepted requests whose producer does not watch engines).
On the bus: ``service`` (the take loop and every subscription), ``dispatch`` (``QueueDispatcher``:
one message offered to engines, or answered from the cache, and settled with JetStream),
``workers`` (``WorkerTracker``: the worker table from heartbeats), ``prompt_cache`` (look up and
replay cache entries), ``cold_start`` (load a registry-only model on an engine first),
``strategy_watch`` (the run-time strategy in KV), ``status`` (the NATS micro service).
``config`` and ``metrics``: the strict configuration and the Prometheus metrics; ``__main__`` runs a replica.
"""
