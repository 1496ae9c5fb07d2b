"""The scheduler's, engine's and trainer's metrics and health server (``services.common.metrics_http``)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from prometheus_client import CollectorRegistry, Counter

from services.common import metrics_http
from tests.support import free_port


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_healthz_says_starting_until_the_service_installs_its_check_and_metrics_are_served_beside_it():
    registry = CollectorRegistry()
    Counter("llm_test_probes_total", "probes", registry=registry).inc()
    health = metrics_http.HealthState()
    port = free_port()
    server = metrics_http.serve("127.0.0.1", port, registry, health)
    try:
        status, body = _get(f"http://127.0.0.1:{port}/healthz")
        assert (status, json.loads(body)["status"]) == (503, "starting")
        health.check = lambda: (False, {"status": "unavailable", "nats": "reconnecting"})
        assert _get(f"http://127.0.0.1:{port}/healthz")[0] == 503
        health.check = lambda: (True, {"status": "ok", "nats": "connected"})
        status, body = _get(f"http://127.0.0.1:{port}/healthz")
        assert (status, json.loads(body)) == (200, {"status": "ok", "nats": "connected"})
        status, body = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and b"llm_test_probes_total 1.0" in body
    finally:
        server.shutdown()
