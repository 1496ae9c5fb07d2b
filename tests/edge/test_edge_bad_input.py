"""Bad requests over HTTP: each gets the right status and an OpenAI error body; none hurts the edge."""

from __future__ import annotations

import asyncio

import pytest

from tests.edge_harness import (  # noqa: F401 - fixtures
    MODEL,
    assert_error,
    chat_body,
    client,
    edge_config,
    engine,
)

CHAT = "/v1/chat/completions"


async def test_malformed_json_is_400(client):
    resp = await client.post(CHAT, data=b'{"model": ', headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert_error(await resp.json(), "invalid_request", None)


async def test_body_that_is_not_an_object_is_400(client):
    resp = await client.post(CHAT, json=[1, 2])
    assert resp.status == 400
    assert_error(await resp.json(), "invalid_request")


async def _expect_400(client, cases: list[tuple[dict, str]], *, whole_body: bool = False) -> None:
    """POST each case (a whole body, or fields added to a valid one); each is a 400 naming ``param``."""
    for fields, param in cases:
        resp = await client.post(CHAT, json=fields if whole_body else chat_body(**fields))
        body = await resp.json()
        assert resp.status == 400, (fields, body)
        assert_error(body, "invalid_request", param)
        assert body["error"]["type"] == "invalid_request_error"


async def test_missing_field_is_400_naming_it(client):
    await _expect_400(client, [
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": MODEL}, "messages"),
        ({"model": MODEL, "messages": [{"content": "hi"}]}, "messages[0].role"),
    ], whole_body=True)


async def test_wrong_type_is_400_with_json_path(client):
    await _expect_400(client, [
        ({"temperature": "hot"}, "temperature"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"messages": [{"role": "user", "content": 42}]}, "messages[0].content"),
        ({"stop": [1]}, "stop[0]"),
    ])


async def test_out_of_range_is_400(client):
    await _expect_400(client, [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"top_k": -1}, "top_k"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"timeout": 0}, "timeout"),
    ])


async def test_unknown_model_is_404_model_not_found(client):
    resp = await client.post(CHAT, json=chat_body(model="no-such-model"))
    assert resp.status == 404
    body = await resp.json()
    assert_error(body, "model_not_found", "model")
    assert "no-such-model" in body["error"]["message"]


@pytest.mark.parametrize("n", [0, 17, -1])
async def test_n_out_of_range_is_invalid(client, n):
    resp = await client.post(CHAT, json=chat_body(n=n))
    assert resp.status == 400
    body = await resp.json()
    assert_error(body, "invalid_request", "n")
    assert "'n' must be in [1, 16]" in body["error"]["message"]


async def test_legacy_batched_prompt_is_unsupported(client):
    resp = await client.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b"]})
    assert resp.status == 400
    assert_error(await resp.json(), "unsupported", "prompt")


async def test_unknown_route_and_wrong_method_are_openai_errors(client):
    resp = await client.get("/v1/nope")
    assert resp.status == 404
    body = await resp.json()
    assert_error(body, "not_found")
    assert "/v1/nope" in body["error"]["message"]
    resp = await client.get(CHAT)
    assert resp.status == 405
    body = await resp.json()
    assert_error(body, "method_not_allowed")
    assert "POST" in resp.headers["Allow"] and "POST" in body["error"]["message"]


async def test_an_id_ending_in_a_newline_is_not_found_never_a_500(client):
    # Python's ``$`` also matches before a final newline: such an id once passed the id check and
    # broke the KV read (found by bench/api_fuzz.py).
    for path in ("/api/v1/training/status/BB%0A", "/v1/fine_tuning/jobs/BB%0A", "/v1/files/file-x%0A",
                 "/v1/batches/batch_x%0A", "/v1/responses/resp_x%0A"):
        resp = await client.get(path)
        assert resp.status == 404, (path, await resp.text())
        assert_error(await resp.json(), "not_found")
    resp = await client.post("/v1/fine_tuning/jobs", json={"model": MODEL, "training_file": "file-x\n"})
    assert resp.status == 400, await resp.text()
    assert_error(await resp.json(), "invalid_request", "training_file")


async def test_body_over_the_limit_is_413(client):
    resp = await client.post(CHAT, data=b"x" * (2 << 20))
    assert resp.status == 413
    assert_error(await resp.json(), "request_too_large")


async def test_burst_of_bad_requests_leaves_the_edge_healthy(client, engine):
    bad = [b"{", b"[]", b'{"model": 1}', b'{"model": "m", "messages": []}', b"\xff\xfe", b"null"]
    bad += [chat_body(temperature=9), chat_body(model="ghost"), chat_body(n=99)]

    async def one(i: int) -> int:
        item = bad[i % len(bad)]
        kwargs = {"data": item} if isinstance(item, bytes) else {"json": item}
        resp = await client.post(CHAT, **kwargs)
        await resp.read()
        return resp.status

    statuses = await asyncio.gather(*(one(i) for i in range(200)))
    assert set(statuses) <= {400, 404}
    assert statuses.count(404) == sum(1 for i in range(200) if bad[i % len(bad)] == chat_body(model="ghost"))
    post = asyncio.create_task(client.post(CHAT, json=chat_body()))
    await engine.serve_one(["still", " fine"])
    resp = await post
    assert resp.status == 200
    assert (await resp.json())["choices"][0]["message"]["content"] == "still fine"
    assert (await client.get("/healthz")).status == 200
