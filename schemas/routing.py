"""Routing strategies: the values of KV ``llm_scheduler_config`` key ``strategy`` (a wire contract)."""

from __future__ import annotations

import enum


class Strategy(enum.StrEnum):
    """The routing strategies; the active one is KV ``llm_scheduler_config`` key ``strategy``."""

    LEAST_CONNECTIONS = "least_connections"
    ROUND_ROBIN = "round_robin"
    WEIGHTED = "weighted"
    RANDOM = "random"
    RESPONSE_TIME = "response_time"
    PREFIX_AFFINITY = "prefix_affinity"
