"""The edge's side of NATS: what it publishes and what it follows.

- ``publish``: ``RequestPublisher``: a request onto its ``LLM_INFER`` lane, cancels out; ``InferenceCall``
  follows one request to its terminal event (and fails it over).
- ``replies``: ``ReplyRouter``: the edge's one reply inbox, routing token events to their requests.
- ``pump``: ``pump``: the one loop over an answer's events, handing each to its wire format's writer.
- ``failover``: what to re-publish after an engine is lost. Pure.
- ``liveness``: ``LivenessWatch``: the worker table from heartbeats, and ending requests whose engine died.
- ``cache_hits``: prompt-cache hits answered by the edge itself.
- ``idempotency``: ``Idempotency-Key`` records.
- ``queue_gauge``: how full the queue is and how fast it drains (``Retry-After``).
- ``registry_view``: the model registry, followed with a KV watch.
"""
