"""``/v1/batches`` with the official SDK: lines run on the low lane, results land in the object store.

The edge runs in-process with its batch runner; ``LowLaneEngine`` answers the low lane (a request
on any other lane would never be answered, so a batch that completes ran there).
"""

from __future__ import annotations

import uuid

import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer

from schemas import names
from services.edge import EdgeConfig, create_app
from services.edge.batch import execute, lines
from tests.batch_harness import LowLaneEngine, chat_line, jsonl, rows_of, wait_ended
from tests.support import wait_for
from tests.edge_harness import MODEL, CancelRecorder, assert_error, cancels, engine, wait_until_served  # noqa: F401


@pytest.fixture
async def low(nc, js):
    """The low lane's engine stand-in."""
    eng = await LowLaneEngine(nc, js, f"low-{uuid.uuid4().hex[:6]}").start()
    try:
        yield eng
    finally:
        await eng.stop()


@pytest.fixture
async def edge(nats_server, nc, engine):
    """The edge in-process (with its batch runner), ``engine`` in its worker table."""
    # A missing stream is retried as a leader election would be: for one second here, not twenty.
    config = EdgeConfig(nats_url=nats_server.url, liveness_interval=0.1, worker_lost_grace=0.2, request_timeout=30,
                        batch_concurrency=8, publish_retry_window=1.0)
    async with TestClient(TestServer(create_app(config))) as c:
        await wait_until_served(c)
        yield c


@pytest.fixture
async def sdk(edge):
    """An ``AsyncOpenAI`` pointed at the in-process edge."""
    async with openai.AsyncOpenAI(base_url=str(edge.make_url("/v1")), api_key="unused", max_retries=0,
                                  timeout=30) as c:
        yield c


async def test_a_batch_of_50_with_one_bad_line_answers_every_good_line_once(sdk, low, edge, js):
    rows = [chat_line(f"req-{i}") for i in range(50)]
    rows[17] = chat_line("req-17", max_tokens=-3)  # valid JSONL, refused by chat completions itself
    uploaded = await sdk.files.create(file=("in.jsonl", jsonl(rows)), purpose="batch")
    assert uploaded.purpose == "batch"
    batch = await sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                     completion_window="24h", metadata={"run": "t1"})
    assert batch.status == "validating" and batch.request_counts.total == 50 and batch.metadata == {"run": "t1"}

    done = await wait_ended(sdk, batch.id)
    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (50, 49, 1)
    assert done.in_progress_at and done.completed_at and done.finalizing_at and done.expires_at > done.created_at

    output = rows_of((await sdk.files.content(done.output_file_id)).content)
    assert sorted(r["custom_id"] for r in output) == sorted(f"req-{i}" for i in range(50) if i != 17)
    for row in output:
        assert row["error"] is None and row["response"]["status_code"] == 200
        message = row["response"]["body"]["choices"][0]["message"]
        assert message["content"] == f"echo:{row['custom_id']}"
        assert row["id"].startswith("batch_req_")
    errors = rows_of((await sdk.files.content(done.error_file_id)).content)
    assert [r["custom_id"] for r in errors] == ["req-17"]
    assert errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["param"] == "max_tokens"
    # Every good line ran once, on the low lane, under an id derived from the batch and its custom_id.
    assert len(low.taken) == 49 and len({r.id for r in low.taken}) == 49
    assert all(r.priority < 0 and r.id == names.batch_request_id(batch.id, r.messages[0].content, 1)
               for r in low.taken)

    metrics = await (await edge.get("/metrics")).text()
    assert 'llm_edge_batch_lines_total{outcome="ok"} 49.0' in metrics
    assert 'llm_edge_batch_lines_total{outcome="err"} 1.0' in metrics

    listed = [b.id async for b in sdk.batches.list()]
    assert listed == [batch.id]
    # The result files hold every line now: the outcomes leave KV (just after the state turned final),
    # the batch's state stays.
    async def only_the_state_is_left() -> bool:
        info = await js.stream_info(names.kv_stream(names.BATCHES_BUCKET), subjects_filter=">")
        return list(info.state.subjects or {}) == [names.kv_key_subject(names.BATCHES_BUCKET, batch.id)]

    assert await wait_for(only_the_state_is_left, timeout=10)
    assert (await sdk.batches.retrieve(batch.id)).model_dump() == done.model_dump()


async def test_cancel_stops_the_running_lines_and_reports_the_rest(sdk, low, cancels: CancelRecorder):
    low.hold = True  # every request stays in flight until the batch is cancelled
    uploaded = await sdk.files.create(file=("in.jsonl", jsonl([chat_line(f"c{i}") for i in range(12)])),
                                      purpose="batch")
    batch = await sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                     completion_window="24h")
    await low.wait_taken(8)  # the runner's 8 slots are busy
    cancelling = await sdk.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at

    done = await wait_ended(sdk, batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (12, 0, 12)
    assert done.output_file_id is None
    errors = rows_of((await sdk.files.content(done.error_file_id)).content)
    assert sorted(r["custom_id"] for r in errors) == sorted(f"c{i}" for i in range(12))
    assert {r["error"]["code"] for r in errors} == {"batch_cancelled"}
    for req in low.taken:  # each running line was cancelled on the bus, by its own request id
        await cancels.wait_for(req.id)
    assert len(low.taken) == 8  # lines not started when the cancel came never ran


async def test_a_malformed_line_is_refused_at_upload_by_line_number(sdk):
    good = jsonl([chat_line("a"), chat_line("b")]).getvalue()
    with pytest.raises(openai.BadRequestError) as bad:
        await sdk.files.create(file=("in.jsonl", good + b'{"custom_id": "c", "method": "POST"\n'), purpose="batch")
    assert bad.value.status_code == 400
    assert_error(bad.value.response.json(), "invalid_request", "file")
    assert "line 3" in bad.value.response.json()["error"]["message"]
    assert [f.id async for f in sdk.files.list(purpose="batch")] == []


async def test_unknown_endpoint_and_repeated_custom_id_are_refused_at_upload(sdk):
    for rows, says in (([chat_line("a"), {**chat_line("b"), "url": "/v1/embeddings"}], "line 2"),
                       ([chat_line("a"), chat_line("b"), chat_line("a")], "already used on line 1")):
        with pytest.raises(openai.BadRequestError) as bad:
            await sdk.files.create(file=("in.jsonl", jsonl(rows)), purpose="batch")
        assert_error(bad.value.response.json(), "invalid_request", "file")
        assert says in bad.value.response.json()["error"]["message"]


async def test_a_batch_of_a_fine_tune_file_or_a_bad_request_is_an_openai_error(sdk, edge):
    tuned = await sdk.files.create(file=("t.jsonl", jsonl([chat_line("a")])), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as bad:
        await sdk.batches.create(input_file_id=tuned.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert_error(bad.value.response.json(), "invalid_request", "input_file_id")
    assert "purpose 'batch'" in bad.value.response.json()["error"]["message"]

    good = await sdk.files.create(file=("in.jsonl", jsonl([chat_line("a")])), purpose="batch")
    for body, param in (({"endpoint": "/v1/embeddings", "completion_window": "24h"}, "endpoint"),
                        ({"endpoint": "/v1/completions", "completion_window": "24h"}, "input_file_id"),
                        ({"endpoint": "/v1/chat/completions", "completion_window": "2d"}, "completion_window"),
                        ({"endpoint": "/v1/chat/completions", "completion_window": "24h",
                          "input_file_id": "file-nope"}, "input_file_id")):
        resp = await edge.post("/v1/batches", json={"input_file_id": good.id, **body})
        assert resp.status == 400, body
        assert_error(await resp.json(), "invalid_request", param)
    resp = await edge.get("/v1/batches/batch_nope")
    assert resp.status == 404
    assert_error(await resp.json(), "not_found")
    assert [b async for b in sdk.batches.list()] == []


async def test_a_batch_that_cannot_be_queued_is_a_503_and_leaves_nothing_behind(sdk, edge, js):
    good = await sdk.files.create(file=("in.jsonl", jsonl([chat_line("a")])), purpose="batch")
    await js.delete_stream(names.BATCH_STREAM)
    resp = await edge.post("/v1/batches", json={"input_file_id": good.id, "endpoint": "/v1/chat/completions",
                                                "completion_window": "24h"})
    assert resp.status == 503
    assert_error(await resp.json(), "unavailable")
    assert "LLM_BATCH" in (await resp.json())["error"]["message"]
    assert [b async for b in sdk.batches.list()] == []


async def test_a_batch_of_responses_lines_answers_response_objects_and_stores_them(sdk, low):
    rows = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/responses",
             "body": {"model": MODEL, "input": f"r{i}", "max_output_tokens": 4, **({"store": False} if i else {})}}
            for i in range(3)]
    uploaded = await sdk.files.create(file=("in.jsonl", jsonl(rows)), purpose="batch")
    batch = await sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/responses", completion_window="24h")
    done = await wait_ended(sdk, batch.id)
    assert (done.status, done.request_counts.completed, done.request_counts.failed) == ("completed", 3, 0)
    output = {r["custom_id"]: r for r in rows_of((await sdk.files.content(done.output_file_id)).content)}
    for custom_id, row in output.items():
        body = row["response"]["body"]
        assert body["object"] == "response" and body["status"] == "completed"
        assert body["output"][0]["content"][0]["text"] == f"echo:{custom_id}"
        assert body["id"] == row["response"]["request_id"]
    kept = await sdk.responses.retrieve(output["r0"]["response"]["body"]["id"])  # stored, as the endpoint does
    assert kept.output_text == "echo:r0"
    with pytest.raises(openai.NotFoundError):  # "store": false was honoured
        await sdk.responses.retrieve(output["r1"]["response"]["body"]["id"])
    assert all(r.priority < 0 for r in low.taken)


def test_every_endpoint_a_line_may_call_has_an_answer():
    assert set(execute.ANSWERS) == set(lines.ENDPOINTS)
