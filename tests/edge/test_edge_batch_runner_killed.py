"""A batch whose runner is SIGKILLed halfway completes on another edge, every line answered exactly once.

Two real edge processes share the batch runners' consumer; the first is killed while it has lines
in flight. The consumer's ``ack_wait`` is shortened so its unacked lines come back in seconds.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid

import aiohttp
import openai
import pytest

from schemas import names
from tests.batch_harness import LowLaneEngine, chat_line, jsonl, rows_of, wait_ended
from tests.edge_harness import MODEL, CancelRecorder, cancels, engine  # noqa: F401 - fixtures
from tests.support import REPO, free_port

LINES = 20
CONCURRENCY = 4


async def _edge(nats_url: str, log) -> tuple[asyncio.subprocess.Process, str]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.edge", "--nats-url", nats_url, "--port", str(port),
        "--batch-concurrency", str(CONCURRENCY), cwd=REPO, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http, asyncio.timeout(30):
        while True:
            assert proc.returncode is None, "the edge exited during start-up"
            try:
                async with http.get(f"{base}/healthz") as resp:
                    if resp.status == 200 and MODEL in (await resp.json())["models"]:
                        return proc, base
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)


@pytest.fixture
async def low(nc, js):
    eng = await LowLaneEngine(nc, js, f"low-{uuid.uuid4().hex[:6]}").start()
    try:
        yield eng
    finally:
        await eng.stop()


async def test_a_killed_runner_loses_no_line_and_repeats_none(nats_server, js, engine, low, cancels: CancelRecorder,
                                                              tmp_path):
    info = await js.consumer_info(names.BATCH_STREAM, names.BATCH_DURABLE)
    info.config.ack_wait = 3.0
    await js.add_consumer(names.BATCH_STREAM, info.config)  # the same durable: an update
    low.answer_first = LINES // 2  # then it holds what it takes: the first edge dies with lines in flight
    log = (tmp_path / "edges.log").open("wb")
    first, base = await _edge(nats_server.url, log)
    procs = [first]
    try:
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=30) as sdk:
            uploaded = await sdk.files.create(file=("in.jsonl", jsonl([chat_line(f"k{i}") for i in range(LINES)])),
                                              purpose="batch")
            batch = await sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                             completion_window="24h")
            await low.wait_taken(LINES // 2 + CONCURRENCY)
        first.send_signal(signal.SIGKILL)
        await first.wait()
        held = low.taken[LINES // 2:]
        low.answer_first = None

        second, base = await _edge(nats_server.url, log)
        procs.append(second)
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=30) as sdk:
            done = await wait_ended(sdk, batch.id, timeout=120)
            assert done.status == "completed", done
            assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == \
                (LINES, LINES, 0)
            output = rows_of((await sdk.files.content(done.output_file_id)).content)
        assert sorted(r["custom_id"] for r in output) == sorted(f"k{i}" for i in range(LINES))
        for row in output:
            assert row["response"]["body"]["choices"][0]["message"]["content"] == f"echo:{row['custom_id']}"
        # The killed edge's lines ran again under their next delivery's id; their first runs were cancelled.
        for req in held:
            custom_id = req.messages[0].content
            assert req.id == names.batch_request_id(batch.id, custom_id, 1)
            await cancels.wait_for(req.id)
            rerun = [r for r in low.taken if r.messages[0].content == custom_id and r.id != req.id]
            assert len(rerun) == 1 and rerun[0].id != req.id
        assert len(low.taken) == LINES + len(held)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await proc.wait()
        log.close()
