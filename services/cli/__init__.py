"""The operator CLI behind ``./cy``: start and stop the platform, provision NATS, run the tests.

``main`` parses arguments; ``up`` runs the platform with ``supervisor`` (child processes) and
``readiness`` (is the edge answering?); ``commands`` holds the smaller commands; ``backup``
(backup and restore of all platform state) speaks JetStream's snapshot API through ``snapshot``
and reports with ``progress``.
"""
