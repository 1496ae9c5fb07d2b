"""Running the edge as a process: HTTP site, signals, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from services.common import gc_heap
from services.common.lifecycle import install_stop_signals
from services.edge.app import create_app
from services.edge.config import EdgeConfig, config_problems
from services.edge.http.parser_refusals import EdgeRunner, count_refusals
from services.edge.state import METRICS

log = logging.getLogger(__name__)


def protocol_limits(config: EdgeConfig) -> dict[str, int]:
    """aiohttp's HTTP parser limits from the config: a longer request line or header, or more
    headers, is a 431 OpenAI error body (see ``services.edge.http.parser_refusals``)."""
    return {"max_line_size": config.max_header_bytes, "max_field_size": config.max_header_bytes,
            "max_headers": config.max_headers}


def edge_runner(app: web.Application, config: EdgeConfig, **kwargs) -> EdgeRunner:
    """The runner that serves the edge app: parser limits from ``config``, parser refusals as OpenAI bodies."""
    return EdgeRunner(app, on_refused=count_refusals(app[METRICS]), **protocol_limits(config), **kwargs)


async def serve(config: EdgeConfig, *, stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set (SIGTERM/SIGINT when not given), then shut down in order.

    Shutdown: stop listening, refuse new requests on open connections (503), let open requests
    and streams finish for up to ``shutdown_timeout`` (then cancel them, which cancels them on the
    bus), and finally drain the NATS connection.
    """
    problems = config_problems(config)
    if problems:
        raise ValueError("; ".join(problems))  # parse_args already refuses these; this guards other callers
    if stop is None:
        stop = asyncio.Event()
        install_stop_signals(stop)
    app = create_app(config)
    runner = edge_runner(app, config, handler_cancellation=True, shutdown_timeout=config.shutdown_timeout,
                         access_log=logging.getLogger("aiohttp.access") if config.access_log else None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        log.info("edge listening on http://%s:%d", config.host, config.port)
        gc_heap.started(app[METRICS].gc_pause)
        await stop.wait()
        log.info("edge shutting down (open requests get up to %gs)", config.shutdown_timeout)
    finally:
        await runner.cleanup()
    log.info("edge stopped")
