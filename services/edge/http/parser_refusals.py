"""What aiohttp's HTTP parser refuses, answered as OpenAI error bodies.

aiohttp parses the request line and headers before any route, middleware or handler runs, and
answers what it cannot parse (a request line or header longer than ``max_line_size`` /
``max_field_size``, more than ``max_headers`` headers, a malformed request line, broken chunked
framing) with a plain-text 400 of its own. ``EdgeRunner`` serves the app with a connection
protocol whose error answer is the edge's: 431 ``headers_too_large`` for the size limits (RFC 6585;
aiohttp does not tell an over-long request line from an over-long header, so both are 431), 400
``invalid_request`` for the rest, and 500/504 OpenAI bodies for what escapes a handler.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from schemas.errors import ErrorCode
from services.edge.errors import HEADERS_TOO_LARGE, plain_error_response, rejection_reason

log = logging.getLogger(__name__)

# aiohttp's own message for more headers than ``max_headers``.
_TOO_MANY_HEADERS = "Too many headers received"

# Called with (status, code) for each request the parser refused.
OnRefused = Callable[[int, str], None]


def parser_refusal(exc: BaseException | None, limit: int) -> tuple[int, str, str]:
    """Status, error code and message for a request aiohttp's parser refused with ``exc``."""
    if isinstance(exc, LineTooLong):
        return 431, HEADERS_TOO_LARGE, (f"the request line or a header field is longer than {limit} bytes; "
                                        "send smaller headers (the edge's --max-header-bytes)")
    if isinstance(exc, BadHttpMessage) and exc.message == _TOO_MANY_HEADERS:
        return 431, HEADERS_TOO_LARGE, "the request has too many header fields (the edge's --max-headers)"
    detail = str(exc.message) if isinstance(exc, HttpProcessingError) else ""
    # aiohttp's parser messages span lines, with a caret line under the offending byte: one line, bounded.
    words = " ".join(line.strip() for line in detail.splitlines() if line.strip() not in ("", "^"))
    return 400, ErrorCode.INVALID_REQUEST, f"malformed HTTP request: {words[:200] or 'it could not be parsed'}"


class EdgeRequestHandler(RequestHandler):
    """aiohttp's connection protocol, answering its own errors with OpenAI error bodies."""

    __slots__ = ("_on_refused",)

    def __init__(self, manager: Server, *, on_refused: OnRefused | None = None, **kwargs) -> None:
        super().__init__(manager, **kwargs)
        self._on_refused = on_refused

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """The answer to a request the parser refused (``exc``) or whose handler failed (500/504)."""
        if request.writer.output_size > 0:
            # Part of an answer is out: the connection is broken, as in aiohttp's own handle_error.
            raise ConnectionError("response is partly sent, cannot send an error response")
        if isinstance(exc, HttpProcessingError):
            status, code, text = parser_refusal(exc, self.max_field_size)
            log.info("refused a request from %s: %s", request.remote, exc.message)
            if self._on_refused is not None:
                self._on_refused(status, code)
        elif status == 504:
            code, text = ErrorCode.TIMEOUT, "the request handler timed out"
        else:
            log.error("error answering a request from %s", request.remote, exc_info=exc)
            status, code, text = 500, ErrorCode.INTERNAL, "internal error in the edge"
        resp = plain_error_response(status, code, text)
        resp.force_close()
        return resp


class EdgeServer(Server):
    """aiohttp's low-level server, making ``EdgeRequestHandler`` connections."""

    def __init__(self, *args, on_refused: OnRefused | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.on_refused = on_refused

    def __call__(self) -> RequestHandler:
        """A protocol for one new connection (what aiohttp's ``Server.__call__`` does, with our class)."""
        return EdgeRequestHandler(self, loop=self._loop, on_refused=self.on_refused, **self._kwargs)


class EdgeRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer parser refusals as OpenAI error bodies.

    ``on_refused(status, code)`` is told about each refusal (the edge counts them in its metrics).
    """

    def __init__(self, app: web.Application, *, on_refused: OnRefused | None = None, **kwargs) -> None:
        super().__init__(app, **kwargs)
        self._on_refused = on_refused

    async def _make_server(self) -> Server:
        server = await super()._make_server()  # starts the app, as AppRunner does
        return EdgeServer(server.request_handler, request_factory=server.request_factory,
                          handler_cancellation=server.handler_cancellation, loop=server._loop,
                          on_refused=self._on_refused, **server._kwargs)


def count_refusals(metrics) -> OnRefused:
    """An ``on_refused`` that counts refusals in the edge's metrics (``EdgeMetrics``)."""

    def on_refused(status: int, code: str) -> None:
        metrics.refused_unparsed(status, rejection_reason(code) or "bad_request")

    return on_refused
