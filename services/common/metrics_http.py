"""The metrics and health HTTP server of the scheduler, engine and trainer (the edge serves both on its own port).

One small server per process, on the address and port its flags give (``--metrics-host``,
``--metrics-port``): ``/metrics`` is the Prometheus exposition, ``/healthz`` answers 200 or 503
with a JSON body saying why, so an orchestrator's probes (``deploy/k8s``) and an operator see the
same thing. Nothing assumes a shared loopback: on another host or in a pod the service binds where
it is told. Served from a thread (prometheus_client's), so ``health`` must only read state.

``PortTakeover`` binds a port another process still holds as soon as that one lets it go: the
engine ``./cy up``'s engine switch starts takes over the metrics port of the engine it replaces
(which keeps serving its own metrics until it has drained and exited), so Prometheus scrapes the
one fixed target (``infra/prometheus/targets/engine.yml``) before and after the switch.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

log = logging.getLogger(__name__)

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


class PortTakeover:
    """``serve``, on a port another process may still hold: bound once it is free, instead of failing.

    A thread tries to bind every ``retry`` seconds while the port is in use (EADDRINUSE); any
    other bind error ends the tries, logged (the service runs on without metrics, as it would
    without ``--metrics-port``). ``server`` is the running server once bound; ``shutdown`` stops
    the tries or the server.
    """

    def __init__(self, host: str, port: int, registry: CollectorRegistry, health: HealthCheck,
                 retry: float = 0.5) -> None:
        self.server: WSGIServer | None = None
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._bind, args=(host, port, registry, health, retry),
                                        name="metrics-http-takeover", daemon=True)
        self._thread.start()

    def _bind(self, host: str, port: int, registry: CollectorRegistry, health: HealthCheck, retry: float) -> None:
        waited = False
        while not self._stopped.is_set():
            try:
                server = serve(host, port, registry, health)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    log.error("metrics: cannot bind %s:%d (%s): serving no metrics", host, port, exc)
                    return
                if not waited:
                    log.info("metrics: %s:%d is in use; serving there once it is free", host, port)
                    waited = True
                self._stopped.wait(retry)
                continue
            with self._lock:
                if not self._stopped.is_set():
                    self.server = server
                    log.info("metrics: serving on %s:%d", host, port)
                    return
            server.shutdown()  # stopped while binding
            server.server_close()
            return

    def shutdown(self) -> None:
        """Stop trying to bind, or stop serving."""
        with self._lock:
            self._stopped.set()
            server = self.server
        if server is not None:
            server.shutdown()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
