"""The metrics and health HTTP server of the scheduler, engine and trainer (the edge serves both on its own port).

One small server per process, on the address and port its flags give (``--metrics-host``,
``--metrics-port``): ``/metrics`` is the Prometheus exposition, ``/healthz`` answers 200 or 503
with a JSON body saying why, so an orchestrator's probes (``deploy/k8s``) and an operator see the
same thing. Nothing assumes a shared loopback: on another host or in a pod the service binds where
it is told. Served from a thread (prometheus_client's), so ``health`` must only read state.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

METRICS_PATH = "/metrics"
HEALTH_PATH = "/healthz"
# What every service's --metrics-host defaults to: reachable only from this host unless told otherwise.
DEFAULT_METRICS_HOST = "127.0.0.1"
METRICS_HOST_HELP = ("address the metrics and health server binds (/metrics, /healthz); 0.0.0.0 or a pod IP to be "
                     f"scraped and probed from other hosts (default: {DEFAULT_METRICS_HOST})")

# A health check: (healthy, details for the JSON body). Called from the server's thread.
HealthCheck = Callable[[], tuple[bool, dict]]


def _not_started() -> tuple[bool, dict]:
    return False, {"status": "starting"}


class HealthState:
    """The health check a service installs once it knows how to tell (before that: 503 ``starting``)."""

    def __init__(self) -> None:
        self.check: HealthCheck = _not_started

    def __call__(self) -> tuple[bool, dict]:
        return self.check()


def nats_health(nc, **extra: object) -> tuple[bool, dict]:
    """Healthy while connected to NATS (a reconnecting client cannot take or answer work)."""
    state = ("connected" if nc.is_connected else "reconnecting" if nc.is_reconnecting else
             "draining" if nc.is_draining else "closed" if nc.is_closed else "disconnected")
    ok = state == "connected"
    return ok, {"status": "ok" if ok else "unavailable", "nats": state, **extra}


def wsgi_app(registry: CollectorRegistry, health: HealthCheck):
    """``/healthz`` from ``health``, every other path the Prometheus exposition (as prometheus_client serves it)."""
    metrics = make_wsgi_app(registry)

    def app(environ, start_response):
        if environ.get("PATH_INFO") != HEALTH_PATH:
            return metrics(environ, start_response)
        ok, body = health()
        start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "application/json")])
        return [json.dumps(body).encode()]

    return app


def serve(host: str, port: int, registry: CollectorRegistry, health: HealthCheck) -> WSGIServer:
    """Serve ``/metrics`` and ``/healthz`` on ``host:port`` from a daemon thread; ``OSError`` if it cannot bind.

    Stop it with ``server.shutdown()``.
    """
    class Server(ThreadingWSGIServer):
        address_family = _family(host)

    server = make_server(host, port, wsgi_app(registry, health), Server, handler_class=_SilentHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
