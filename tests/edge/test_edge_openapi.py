"""``/openapi.json`` is true: it lists exactly the routes that exist, and answers conform to it."""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
import nats.errors
import pytest
from aiohttp.test_utils import TestClient, TestServer

from schemas import names
from services.common.lifecycle import cancel_and_wait
from services.edge import create_app
from services.edge.system.openapi import build_document
from tests.edge_harness import (  # noqa: F401 - fixtures
    MODEL,
    client,
    edge_config,
    engine,
    wait_until_served,
)



# A WebSocket upgrade (tests/edge/test_edge_websocket.py) and a live stream that follows a job until it ends
# (tests/edge/test_edge_training_native.py): neither is a request/response a fuzzer can judge.
_NOT_FUZZED = ("/api/v1/inference/ws", "/api/v1/training/{job_id}/stream")
# Routes answered over an engine's control subject, which the test double does not serve (its 503
# says so): bench/api_fuzz.py fuzzes them against the real engine.
_CONTROL = ("/tokenize", "/detokenize", "/v1/models/load")


def _routes(app) -> set[tuple[str, str]]:
    out = set()
    for route in app.router.routes():
        if route.method in ("HEAD", "OPTIONS", "*"):
            continue
        info = route.resource.get_info()
        path = info.get("path") or info.get("formatter")
        out.add((route.method.lower(), path.replace("{model:.+}", "{model}")))
    return out


async def test_document_is_served_and_lists_exactly_the_routes(client, edge_config):
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    doc = await resp.json()
    assert doc["openapi"].startswith("3.1") and doc == msgspec.json.decode(msgspec.json.encode(build_document()))
    documented = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    routes = _routes(client.server.app)
    assert documented == routes
    chat = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "messages" in doc["components"]["schemas"][chat["$ref"].rsplit("/", 1)[-1]]["required"]


async def _answer_everything(engine) -> None:
    """Play the engine for whatever valid request gets through, on every lane."""
    while True:
        for lane in names.LANES_BY_PRIORITY:
            with contextlib.suppress(nats.errors.TimeoutError):
                req = await engine.next_request(lane, timeout=0.05)
                await engine.answer(req, ["generated"])


def _name_the_served_model(body: object, index: int) -> None:
    """Every other generated body that names a model names the served one, so answers (JSON and SSE)
    are generated and checked against the document too, not only the 404 of a made-up model."""
    if isinstance(body, dict) and index % 2 == 0:
        for field in ("model", "modelId"):
            if field in body:
                body[field] = MODEL


def _run_schemathesis(base_url: str) -> int:
    """Every operation, a few dozen generated requests each: no 5xx, and every answer as documented."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    schema = schemathesis.openapi.from_dict(build_document())
    ran = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path in _NOT_FUZZED:
            continue

        examples = iter(range(10**6))

        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case) -> None:
            if operation.path not in _CONTROL:
                _name_the_served_model(case.body, next(examples))
            response = case.call(base_url=base_url, timeout=15)
            case.validate_response(response, checks=checks)

        check()
        ran += 1
    return ran


async def test_generated_requests_get_no_5xx_and_conform_to_the_document(nc, edge_config, engine):
    config = msgspec.structs.replace(edge_config, request_timeout=3)
    async with TestClient(TestServer(create_app(config))) as c:
        await wait_until_served(c)
        answering = asyncio.create_task(_answer_everything(engine))
        try:
            ran = await asyncio.to_thread(_run_schemathesis, str(c.make_url("")).rstrip("/"))
        finally:
            await cancel_and_wait(answering)
    operations = sum(len(ops) for path, ops in build_document()["paths"].items() if path not in _NOT_FUZZED)
    assert ran == operations
