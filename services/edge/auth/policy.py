"""Which scope each endpoint needs: one table, first matching row wins.

A new route adds a row here. A path no row matches needs ``admin`` (fail closed), so a route
added without a row is never open by accident.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.auth import Scope

OPEN = None  # no credentials needed


@dataclass(frozen=True)
class Rule:
    """Requests to ``prefix`` (itself or anything under ``prefix/``), optionally only for ``methods``."""

    prefix: str
    scope: Scope | None
    methods: frozenset[str] | None = None

    def matches(self, method: str, path: str) -> bool:
        """Whether this row applies to ``method path``."""
        if self.methods is not None and method not in self.methods:
            return False
        return path == self.prefix or path.startswith(self.prefix.rstrip("/") + "/")


RULES: tuple[Rule, ...] = (
    Rule("/healthz", OPEN),
    Rule("/metrics", OPEN),
    Rule("/openapi.json", OPEN),
    Rule("/api/v1/health", OPEN),
    # Management.
    Rule("/v1/models/load", Scope.ADMIN),
    Rule("/v1/models", Scope.ADMIN, frozenset({"DELETE"})),
    Rule("/v1/system", Scope.ADMIN),
    Rule("/v1/cluster", Scope.ADMIN),
    # Training.
    Rule("/v1/fine_tuning", Scope.TRAINING),
    Rule("/v1/files", Scope.TRAINING),
    Rule("/api/v1/training", Scope.TRAINING),
    # Inference.
    Rule("/v1/batches", Scope.INFERENCE),
    Rule("/v1/chat/completions", Scope.INFERENCE),
    Rule("/v1/completions", Scope.INFERENCE),
    Rule("/v1/responses", Scope.INFERENCE),
    Rule("/v1/models", Scope.INFERENCE),
    Rule("/tokenize", Scope.INFERENCE),
    Rule("/detokenize", Scope.INFERENCE),
    Rule("/api/v1/inference", Scope.INFERENCE),
    Rule("/api/v1/models", Scope.INFERENCE),
)
UNLISTED = Scope.ADMIN


def required_scope(method: str, path: str) -> Scope | None:
    """The scope ``method path`` needs, or ``None`` for an open endpoint."""
    for rule in RULES:
        if rule.matches(method, path):
            return rule.scope
    return UNLISTED
