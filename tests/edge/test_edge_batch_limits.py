"""Batches under per-key rate limits and their completion window."""

from __future__ import annotations

import asyncio
import uuid

import msgspec
import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer

from services.edge import EdgeConfig, create_app
from tests.batch_harness import LowLaneEngine, chat_line, jsonl, rows_of, wait_ended
from tests.edge_harness import CancelRecorder, cancels, chat_body, engine, wait_until_served  # noqa: F401
from tests.support import counter_total, frozen_minute, wait_for

RPM = 3


@pytest.fixture
async def low(nc, js):
    eng = await LowLaneEngine(nc, js, f"low-{uuid.uuid4().hex[:6]}").start()
    try:
        yield eng
    finally:
        await eng.stop()


@pytest.fixture
async def limited(nats_server, nc, engine):
    """An edge allowing each caller RPM requests a minute (on a clock stopped inside one minute)."""
    config = EdgeConfig(nats_url=nats_server.url, liveness_interval=0.1, worker_lost_grace=0.2, request_timeout=30,
                        rate_rpm=RPM, batch_concurrency=8)
    async with TestClient(TestServer(create_app(config, rate_clock=frozen_minute()))) as c:
        await wait_until_served(c)
        yield c


async def test_a_batch_spends_its_own_budget_not_the_callers_interactive_one(limited, engine, low):
    async with openai.AsyncOpenAI(base_url=str(limited.make_url("/v1")), api_key="unused", max_retries=0) as sdk:
        uploaded = await sdk.files.create(file=("in.jsonl", jsonl([chat_line(f"l{i}") for i in range(6)])),
                                          purpose="batch")
        batch = await sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                         completion_window="24h")

        async def refused() -> bool:
            text = await (await limited.get("/metrics")).text()
            return counter_total(text, "rate_limited_total") >= 1

        assert await wait_for(refused, timeout=30)  # the batch's fourth line met the batch's budget
        assert len(low.taken) == RPM
        assert (await sdk.batches.retrieve(batch.id)).request_counts.completed == RPM

        # The caller's interactive budget is untouched: its first request of the minute is admitted.
        answering = asyncio.create_task(engine.serve_one(["fine"]))
        resp = await limited.post("/v1/chat/completions", json=chat_body())
        await answering
        assert resp.status == 200
        assert resp.headers["x-ratelimit-remaining-requests"] == str(RPM - 1)


@pytest.fixture
async def edge(nats_server, nc, engine):
    config = EdgeConfig(nats_url=nats_server.url, liveness_interval=0.1, worker_lost_grace=0.2, request_timeout=30,
                        batch_concurrency=8)
    async with TestClient(TestServer(create_app(config))) as c:
        await wait_until_served(c)
        yield c


async def test_a_batch_whose_window_ends_is_expired_with_its_unfinished_lines_reported(edge, low,
                                                                                      cancels: CancelRecorder):
    low.hold = True
    async with openai.AsyncOpenAI(base_url=str(edge.make_url("/v1")), api_key="unused", max_retries=0) as sdk:
        uploaded = await sdk.files.create(file=("in.jsonl", jsonl([chat_line(f"x{i}") for i in range(4)])),
                                          purpose="batch")
        batch = await sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                         completion_window="3s")
        assert batch.expires_at == batch.created_at + 3
        await low.wait_taken(4)
        done = await wait_ended(sdk, batch.id)
        assert done.status == "expired" and done.expired_at
        assert (done.request_counts.completed, done.request_counts.failed) == (0, 4)
        errors = rows_of((await sdk.files.content(done.error_file_id)).content)
    assert sorted(r["custom_id"] for r in errors) == [f"x{i}" for i in range(4)]
    assert {r["error"]["code"] for r in errors} == {"batch_expired"}
    for req in low.taken:
        assert req.deadline <= done.expires_at  # no line was allowed to run past the window
        await cancels.wait_for(req.id)


def test_a_batch_marked_expired_stops_its_lines_even_before_its_window_ends_here():
    """Another edge's clock may have expired it first: its status alone stops the lines, with the
    OpenAI error code of an expired batch (not the batch status's own name)."""
    from schemas.batch import EXPIRED, IN_PROGRESS, BatchState
    from services.edge.batch.runner import stop_reason

    state = BatchState(id="batch_x", endpoint="/v1/chat/completions", input_file_id="file-x",
                       completion_window="24h", status=EXPIRED, created_at=0, expires_at=2_000, total=1)
    assert stop_reason(state, now=1_000) == ("batch_expired", "the batch's completion window ended before this "
                                                               "request finished")
    assert stop_reason(msgspec.structs.replace(state, status=IN_PROGRESS), now=1_000) is None
    assert stop_reason(msgspec.structs.replace(state, status=IN_PROGRESS), now=2_000)[0] == "batch_expired"
