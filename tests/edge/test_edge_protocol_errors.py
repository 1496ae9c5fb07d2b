"""What aiohttp's HTTP parser refuses (oversized or too many headers, malformed requests) is an
OpenAI error body with the right status, over raw sockets, and the edge keeps serving."""

from __future__ import annotations

import json

import msgspec
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry

from services.edge import create_app
from services.edge.http.parser_refusals import parser_refusal
from tests.edge_harness import (  # noqa: F401 - fixtures
    assert_error,
    edge_config,
    engine,
    wait_until_served,
)
from tests.edge_wire import EdgeTestServer, exchange, request


@pytest.fixture
async def edge(nc, edge_config, engine):
    """The edge app served by its own runner (small limits), and its metrics registry."""
    config = msgspec.structs.replace(edge_config, max_header_bytes=4096, max_headers=32)
    registry = CollectorRegistry()
    async with TestClient(EdgeTestServer(create_app(config, registry=registry), config)) as client:
        await wait_until_served(client)
        yield client, registry


def test_parser_refusals_map_to_statuses():
    from aiohttp.http_exceptions import BadHttpMessage, BadStatusLine, LineTooLong

    assert parser_refusal(LineTooLong(b"x" * 10, 4096), 4096)[:2] == (431, "headers_too_large")
    assert parser_refusal(BadHttpMessage("Too many headers received"), 4096)[:2] == (431, "headers_too_large")
    status, code, message = parser_refusal(BadStatusLine("", "Invalid method encountered:\n\n  b'X'\n  ^"), 4096)
    assert (status, code) == (400, "invalid_request") and message == "malformed HTTP request: " \
        "Invalid method encountered: b'X'"


@pytest.mark.parametrize(("name", "raw", "status", "code"), [
    ("oversized header", request("/healthz", "X-Big: " + "a" * 5000), 431, "headers_too_large"),
    ("oversized header name", request("/healthz", "X-" + "b" * 5000 + ": 1"), 431, "headers_too_large"),
    ("too many headers", request("/healthz", *(f"X-H{i}: {i}" for i in range(40))), 431, "headers_too_large"),
    ("oversized request line", request("/healthz?q=" + "c" * 5000), 431, "headers_too_large"),
    ("malformed request line", b"THIS IS NOT HTTP\r\n\r\n", 400, "invalid_request"),
    ("bad method", request("/healthz", method="G@T"), 400, "invalid_request"),
    ("bad HTTP version", b"GET /healthz HTTP/9.9\r\nHost: edge\r\n\r\n", 400, "invalid_request"),
    ("bad chunked encoding",
     request("/v1/chat/completions", "Content-Type: application/json", "Transfer-Encoding: chunked", method="POST")
     + b"zz\r\n{}\r\n0\r\n\r\n", 400, "invalid_request"),
    ("chunked and content-length",
     request("/v1/chat/completions", "Transfer-Encoding: chunked", "Content-Length: 5", method="POST")
     + b"0\r\n\r\n", 400, "invalid_request"),
])
async def test_parser_refusals_are_openai_errors_and_the_edge_keeps_serving(edge, name, raw, status, code):
    client, registry = edge
    got, headers, body = await exchange(client.port, raw)
    assert got == status, (name, body)
    assert headers["content-type"].startswith("application/json"), name
    parsed = json.loads(body)
    assert_error(parsed, code, None)
    assert parsed["error"]["type"] == "invalid_request_error"
    reason = "headers_too_large" if status == 431 else "bad_request"
    assert registry.get_sample_value("llm_edge_rejected_requests_total", {"reason": reason}) == 1
    assert registry.get_sample_value("llm_edge_requests_total", {"route": "unmatched", "status": str(status)}) == 1
    # The edge still answers, on a new connection and through its normal client.
    assert (await exchange(client.port, request("/healthz", "Connection: close")))[0] == 200
    assert (await client.get("/healthz")).status == 200


async def test_headers_just_under_the_limits_are_served(edge):
    client, _ = edge
    resp = await client.get("/healthz", headers={"X-Fits": "a" * 3000, **{f"X-H{i}": "1" for i in range(20)}})
    assert resp.status == 200


async def test_routing_errors_are_openai_errors_over_raw_sockets(edge):
    client, registry = edge
    status, headers, body = await exchange(client.port, request("/nowhere", "Connection: close"))
    assert status == 404
    assert_error(json.loads(body), "not_found")
    status, headers, body = await exchange(client.port, request("/v1/chat/completions", "Connection: close"))
    assert status == 405 and headers["allow"] == "POST"
    assert_error(json.loads(body), "method_not_allowed")
    assert registry.get_sample_value("llm_edge_rejected_requests_total", {"reason": "not_found"}) == 1
    assert registry.get_sample_value("llm_edge_rejected_requests_total", {"reason": "method_not_allowed"}) == 1
