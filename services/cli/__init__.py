"""The operator CLI behind ``./cy``: start and stop the platform, provision NATS, keys, training.

- ``main``: argument parsing. ``__main__``: ``python -m services.cli``. ``errors``: ``CliError``.
- ``up``: ``./cy up``, the whole platform as processes on one NATS; ``supervisor`` runs the children,
  ``readiness`` waits for the edge, ``banner`` says where it is, ``pidfile`` is for ``./cy down``.
- ``commands``: ``down``, ``infra apply``, ``nats``, ``model install``, ``test``. ``infra``: applying
  ``jetstream.toml``. ``nats_auth``: the bus identities of ``./cy up``, ``./cy nats permissions|rotate``.
- ``keys``: ``./cy keys``: API keys in ``llm_api_keys``.
- ``train``, ``train_client``: ``./cy train`` through an edge's HTTP API.
- ``backup``: ``./cy backup`` / ``./cy restore``, all platform state; ``snapshot`` speaks JetStream's
  stream snapshot/restore API, ``progress`` draws the bars.
"""
