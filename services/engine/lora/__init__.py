"""PEFT adapters for the backends.

- ``sources``: where an adapter's files come from (``--adapter-dir``, else the registry and object
  store); ``ThreadedAdapters`` for backends whose model thread loads them.
- ``shapes``: does an adapter fit the base model (A/B shapes against the base weights, headers only)?
"""
