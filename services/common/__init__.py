"""What more than one service uses.

- ``bus``: connecting to NATS alike everywhere; ``BUS_DOWN``, the one meaning of "the bus is down".
- ``bus_permissions`` (pure): each bus identity's NATS permissions, from ``schemas.names``;
  ``bus_auth``: their nkey seed files and the server's ``authorization`` block.
- ``lifecycle``: logging, event loop, signals, stopping tasks.
- ``buckets``: binding to provisioned KV buckets a service can run without.
- ``worker_table`` (pure) and ``heartbeat_feed``: the table of live engines, built from heartbeats.
- ``load_placement``: which engine loads a model no live engine serves. Pure.
- ``recent``: request ids remembered for a while.
- ``cache_key`` (pure), ``prompt_cache``, ``cache_mirror``: the prompt cache's key, reader and memory mirror.
- ``model_ref``: ``<base>:<adapter>`` model names. ``model_registry``: KV ``llm_models``.
- ``model_store``: the local model store and the default model. ``artifacts``: object store ``llm_artifacts``.
- ``api_keys`` (pure) and ``api_key_store``: API keys and the ``llm_api_keys`` bucket.
- ``tool_format`` (pure): the one tool-calling format: tools and calls into chat messages, the
  grammar of calls, reading calls back (edge and trainer).
- ``natsserver``: an embedded ``nats-server``. ``hosts``: which bind addresses are local only.
"""
