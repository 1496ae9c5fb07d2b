"""The scheduler: takes inference requests off JetStream by priority and dispatches them to engines.

Pure logic, no I/O: ``selection`` (the routing strategies: which engine), ``placement``
(capacity net of this replica's own unanswered dispatches, plus the routing state),
``circuit`` (per-engine circuit breakers), ``prefix_index`` and ``response_times`` (what
``prefix_affinity`` and ``response_time`` learn), ``cache_key`` (the prompt cache's key and
eligibility), ``lanes`` (which lane to take from, how many), ``routing`` (what to do with one
message) and ``recent`` (remembered request ids).
On the bus: ``workers`` feeds the worker table from heartbeats, ``dispatch`` hands one message
to engines (or answers it from the cache) and settles it with JetStream, ``prompt_cache``
reads and replays cache entries, ``strategy_watch`` follows the run-time strategy in KV,
``status`` is the NATS micro service, and ``service`` runs the take loop and owns the
subscriptions. ``config`` and ``metrics`` hold the strict configuration and the Prometheus
metrics; ``engine_double`` is a test double only.
"""
