"""Metric names: every series a service exports is ``llm_<service>_<noun>_<unit>``.

The names are read from the registries the services really build (the edge through its app), so
a metric added anywhere with a stray prefix, a counter without ``_total``, a histogram without
its unit, or a label that would carry a request id fails here. docs/observability.md's table from
the seed documents' names to these is checked against the same registries, so it cannot point
at a series that does not exist.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from services.edge.app import create_app
from services.edge.config import EdgeConfig
from services.edge.state import METRICS
from services.engine.metrics import EngineMetrics
from services.scheduler.metrics import SchedulerMetrics
from services.trainer.metrics import TrainerMetrics

DOC = Path(__file__).resolve().parents[2] / "docs" / "observability.md"
# Units a histogram may measure in (Prometheus base units).
HISTOGRAM_UNITS = ("_seconds", "_bytes")
# Labels whose values are unbounded: one series per request or caller would never be freed.
UNBOUNDED_LABELS = {"request_id", "request", "id", "prompt", "user", "api_key", "key", "trace_id"}
# The seed documents' vocabularies and the service each one names.
SEED_PREFIXES = {"gateway_": "edge", "coordinator_": "scheduler", "worker_": "engine", "trainer_": "trainer"}


def _scheduler_metrics() -> SchedulerMetrics:
    metrics = SchedulerMetrics(CollectorRegistry())
    metrics.watch_circuits(lambda: {})  # the circuit-state family is registered by the service at start
    return metrics


def _registries() -> dict[str, object]:
    """Each service's metrics object, built the way its process builds it."""
    return {"edge": create_app(EdgeConfig())[METRICS], "scheduler": _scheduler_metrics(),
            "engine": EngineMetrics(CollectorRegistry()), "trainer": TrainerMetrics(CollectorRegistry())}


SERVICES = _registries()


def _families(service: str) -> dict[str, str]:
    """Exported family name (as written in a query: counters with ``_total``) -> its type."""
    out = {}
    for family in SERVICES[service].registry.collect():
        out[family.name + ("_total" if family.type == "counter" else "")] = family.type
    return out


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_series_follows_the_house_scheme(service: str):
    families = _families(service)
    assert families
    for name, kind in families.items():
        assert re.fullmatch(rf"llm_{service}_[a-z][a-z0-9_]*[a-z0-9]", name), f"{name}: not llm_{service}_<noun>_<unit>"
        if kind == "counter":
            assert name.endswith("_total"), name
        elif kind == "histogram":
            assert name.endswith(HISTOGRAM_UNITS), f"{name}: a histogram names its unit {HISTOGRAM_UNITS}"
        else:
            assert kind == "gauge" and not name.endswith("_total"), f"{name} ({kind})"


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_labels_are_bounded(service: str):
    metrics = SERVICES[service]
    wrappers = [m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)]
    assert wrappers
    for wrapper in wrappers:
        assert not set(wrapper._labelnames) & UNBOUNDED_LABELS, f"{wrapper._name}: {wrapper._labelnames}"


def _doc_mapping() -> list[tuple[str, str, str]]:
    """The (old, new, type) rows of docs/observability.md's 'Metric names' table."""
    section = DOC.read_text().split("\n## Metric names\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| `([a-z_]+)` \| (counter|gauge|histogram) \|$", section, re.MULTILINE)
    assert rows, "docs/observability.md has no old -> new metric table under '## Metric names'"
    return rows


def test_the_documented_old_names_map_to_exported_series_of_the_same_service():
    exported = {name: (service, kind) for service in SERVICES for name, kind in _families(service).items()}
    rows = _doc_mapping()
    assert len({old for old, _, _ in rows}) == len(rows) == len({new for _, new, _ in rows})
    for old, new, kind in rows:
        assert new in exported, f"{old} -> {new}: {new} is not exported"
        service = next((s for prefix, s in SEED_PREFIXES.items() if old.startswith(prefix)), None)
        assert service is not None, f"{old} is not one of the seed vocabularies {sorted(SEED_PREFIXES)}"
        assert exported[new] == (service, kind), f"{old} -> {new}: exported as {exported[new]}"
        assert old not in exported, f"{old} is still exported"
