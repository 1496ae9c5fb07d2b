"""The transformers backend: a Hugging Face causal LM on CPU or CUDA.

- ``engine``: ``TransformersEngine``, the ``EngineBackend``.
- ``batching``: continuous batching in the model thread, one ``RowBatch`` per adapter.
- ``row_batch``: one batch of rows sharing a KV cache.
- ``sampling``: per-row token sampling.
- ``adapter_slots``: the PEFT adapters loaded into the model (LRU).
- ``prefix_cache``: prompt-prefix KV reused per adapter, bounded in bytes (LRU).
"""
