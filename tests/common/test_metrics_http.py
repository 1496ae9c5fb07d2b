"""The scheduler's, engine's and trainer's metrics and health server (``services.common.metrics_http``)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from prometheus_client import CollectorRegistry, Counter

from services.common import metrics_http
from tests.support import free_port, wait_for


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


async def test_a_takeover_binds_the_port_its_holder_releases_and_serves_its_own_metrics_there():
    held, mine = CollectorRegistry(), CollectorRegistry()
    Counter("llm_test_old_total", "the holder's", registry=held).inc()
    Counter("llm_test_new_total", "the taker's", registry=mine).inc(3)
    port = free_port()
    holder = metrics_http.serve("127.0.0.1", port, held, lambda: (True, {"worker": "old"}))
    takeover = metrics_http.PortTakeover("127.0.0.1", port, mine, lambda: (True, {"worker": "new"}), retry=0.05)
    try:
        # While the holder runs, its own metrics stay on the port: the takeover waits, it does not fail.
        assert json.loads(_get(f"http://127.0.0.1:{port}/healthz")[1]) == {"worker": "old"}
        assert takeover.server is None
        holder.shutdown()
        holder.server_close()  # the holder's exit, as far as the port is concerned

        async def taken() -> bool:
            return takeover.server is not None

        assert await wait_for(taken, 30)
        assert json.loads(_get(f"http://127.0.0.1:{port}/healthz")[1]) == {"worker": "new"}
        status, body = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and b"llm_test_new_total 3.0" in body and b"llm_test_old_total" not in body
    finally:
        holder.shutdown()
        takeover.shutdown()
