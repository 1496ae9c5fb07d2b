"""The engine: one process serving models behind one backend interface, on the bus.

- ``__main__``: ``python -m services.engine``; ``build_backend`` makes the configured backend.
- ``service``: ``EngineService``: accepts dispatches, streams tokens to reply subjects, heartbeats, cancel.
- ``backend``: ``EngineBackend``, the interface every backend implements, and its events.
- ``model_host``: the models this process holds (one backend each), loaded and unloaded at run time.
- ``eviction``: which models to unload so one more fits. Pure.
- ``control``: the control subject: ``load`` / ``unload`` / ``list``.
- ``response_cache``: the engine's side of the prompt cache (store a finished response).
- ``engine_choice``: ``--engine auto``.
- ``config``: the strict configuration, parsed once. ``metrics``: Prometheus metrics.

Folders:
- ``backends/``: one backend per library (transformers, llama.cpp, vLLM, TensorRT-LLM, MindIE, MLX, simulated).
- ``text/``: prompt rendering, detokenization and stop strings, shared by the backends.
- ``lora/``: where PEFT adapters come from and whether they fit a base model.
"""
