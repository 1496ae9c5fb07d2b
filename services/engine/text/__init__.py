"""Text handling shared by the backends. Pure logic.

- ``prompt``: what the model sees (chat template or raw prompt, then a migrated answer so far);
  the context-length check.
- ``detok``: incremental detokenization and stop strings, for backends that sample token ids.
- ``deltas``: text deltas from external engines to ``Chunk``s, cut at stop strings.
"""
