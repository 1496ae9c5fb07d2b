"""``./cy up`` (``--engine auto``) on a first run without llama-cpp-python: it serves with transformers,
"builds" llama.cpp in the background, then switches to it while requests stream without pause.

The build is the real code path with its two machine-facing commands replaced (``CY_LLAMACPP_PROBE``,
``CY_LLAMACPP_INSTALL``): llama-cpp-python counts as missing until the install command, which the
test releases once transformers has answered, creates a flag file. The llama.cpp engine that then
starts is real (llama-cpp-python must be installed, as ./cy test does), on the real default model.

Streams go on throughout, through the bus as a NATS-native producer (each one says which engine
runs it) and through the edge over HTTP/SSE; every one must end complete, none cut or lost. The
engine's Prometheus port serves the transformers engine before the switch and the llama.cpp engine
after it, with the tokens the llama.cpp engine generated.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import msgspec
import psutil
import pytest

from schemas import names
from schemas.events import StreamEnd, StreamError, StreamStart, TokenDelta, decode_event
from schemas.inference import ChatMessage, InferenceRequest, SamplingParams
from services.cli import engine_auto
from services.cli.up import worker_id
from services.common.model_store import DEFAULT_MODEL_ID
from tests.support import CyUp, state_dir_with_models, wait_for

pytest.importorskip("llama_cpp", reason="the llama.cpp engine needs the [llamacpp] extra (./cy test installs it)")
pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Long enough on transformers to outlast the llama.cpp engine's start: it is in flight when the drain begins.
LONG_PROMPT = "Count from 1 to 300, separated by commas."
PROMPTS = ["Name a color.", "Count from one to five.", "Say hello to a friend.", "What is two plus two?"]


@dataclass
class Stream:
    """One request as its producer saw it."""

    id: str
    order: int
    worker: str = ""
    deltas: list[int] = field(default_factory=list)
    text: str = ""
    end: StreamEnd | StreamError | None = None


async def _bus_stream(nc, order: int, prompt: str = "", max_tokens: int = 24,
                      on_delta: Callable[[], None] = lambda: None) -> Stream:
    """One streamed chat request through the bus, read to its terminal event."""
    stream = Stream(id=f"switch-{uuid.uuid4().hex[:8]}", order=order)
    sub = await nc.subscribe(nc.new_inbox())
    req = InferenceRequest(id=stream.id, model=DEFAULT_MODEL_ID, reply_to=sub.subject, cache=False,
                           created=time.time(),
                           messages=[ChatMessage(role="user", content=prompt or PROMPTS[order % 4])],
                           sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0))
    await nc.jetstream().publish(names.infer_submit("normal"), msgspec.json.encode(req))
    try:
        while stream.end is None:
            match decode_event((await sub.next_msg(timeout=180)).data):
                case StreamStart(worker=worker):
                    stream.worker = worker
                case TokenDelta(seq=seq, text=text):
                    stream.deltas.append(seq)
                    stream.text += text
                    on_delta()
                case StreamEnd() | StreamError() as end:
                    stream.end = end
    finally:
        await sub.unsubscribe()
    return stream


async def _http_stream(http: aiohttp.ClientSession, url: str, order: int) -> tuple[str, str | None, bool]:
    """One streamed chat completion through the edge: its text, last finish_reason and whether [DONE] came."""
    body = {"model": DEFAULT_MODEL_ID, "stream": True, "max_tokens": 16, "temperature": 0, "cache": False,
            "messages": [{"role": "user", "content": PROMPTS[order % 4]}]}
    text, finish, done = "", None, False
    async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for raw in resp.content:
            line = raw.decode().strip()
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                for choice in chunk["choices"]:
                    text += choice["delta"].get("content") or ""
                    finish = choice.get("finish_reason") or finish
    return text, finish, done


async def _engine_health(up: CyUp) -> dict:
    """What the engine's metrics port (``up``'s ``--metrics-port`` + 1) answers at ``/healthz``; {} if nothing."""
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{up.metrics_port + 1}/healthz") as resp:
                return await resp.json(content_type=None)
    except aiohttp.ClientError:
        return {}


@pytest.mark.timeout(1200)  # a platform start, two engines and streams all along, on a shared CPU
async def test_first_run_serves_with_transformers_then_switches_to_llamacpp_losing_nothing(
        tmp_path, default_model_dir, monkeypatch):
    built, go = tmp_path / "llamacpp-built", tmp_path / "build-may-finish"
    monkeypatch.setenv(engine_auto.PROBE_ENV, f"test -e {built}")
    # The "build": prints progress, waits for the test's go-ahead, then makes llama-cpp-python "importable".
    monkeypatch.setenv(engine_auto.INSTALL_ENV, f"echo compiling; while [ ! -e {go} ]; do sleep 0.1; done; "
                                                f"echo done; touch {built}")
    old, new = worker_id("transformers"), worker_id("llamacpp")
    with CyUp(state_dir_with_models(tmp_path, default_model_dir), "--no-trainer") as up:
        assert "engine auto: transformers, because llama-cpp-python is not installed yet" in up.output()
        producer = await up.nats_connect("producer")
        streams: list[Stream] = []
        http_results: list[tuple[str, str | None, bool]] = []
        switched = asyncio.Event()
        after_switch: list[int] = []  # orders of requests submitted once the switch was reported

        submitted = itertools.count()

        async def bus_client() -> None:
            while not (switched.is_set() and sum(s.order in after_switch for s in streams) >= 4):
                if "staying on transformers" in up.output():
                    return  # the switch failed: the assertions below say so
                order = next(submitted)
                if "llama.cpp: switched" in up.output():
                    switched.set()
                    after_switch.append(order)
                streams.append(await _bus_stream(producer, order))

        async def http_client() -> None:
            async with aiohttp.ClientSession() as http:
                while not switched.is_set() and "staying on transformers" not in up.output():
                    http_results.append(await _http_stream(http, up.url, len(http_results)))

        async def answered() -> bool:
            return bool(streams)

        clients = [asyncio.create_task(bus_client()) for _ in range(2)] + [asyncio.create_task(http_client())]
        long: asyncio.Task[Stream] | None = None
        try:
            # transformers answers first; only then may the build finish, while a long stream runs on it.
            assert await wait_for(answered, 600), up.output()
            assert "llama.cpp build" in up.output() and "compiling" in up.output()
            assert (await _engine_health(up)).get("worker") == old, "before the switch, transformers is scraped"
            streaming = asyncio.Event()
            drained_while_running: list[bool] = []  # at the long stream's end: had the old engine been drained?
            long = asyncio.create_task(_bus_stream(producer, -1, LONG_PROMPT, 200, streaming.set))
            long.add_done_callback(lambda _: drained_while_running.append("takes no more work" in up.output()))
            await asyncio.wait_for(streaming.wait(), 600)
            go.touch()
            await asyncio.wait_for(asyncio.gather(*clients, long), 600)
        finally:
            for task in [*clients, *([long] if long is not None else [])]:
                task.cancel()
            await producer.close()
        assert "llama.cpp: switched" in up.output(), up.output()[-3000:]

        # The port the transformers engine held until it exited serves the llama.cpp engine's metrics now.
        async def llamacpp_scraped() -> bool:
            return (await _engine_health(up)).get("worker") == new

        assert await wait_for(llamacpp_scraped, 60), up.output()[-3000:]
        scraped_tokens = await up.generated_tokens()

    out = up.output()
    every = [*streams, long.result()]
    assert not [s for s in every if not isinstance(s.end, StreamEnd)], "every stream ends with StreamEnd"
    for s in every:
        assert s.end.finish_reason in ("stop", "length") and s.text, s
        assert s.deltas == list(range(1, len(s.deltas) + 1)), f"{s.id} lost a delta: {s.deltas}"
        assert s.worker in (old, new), s
    long_stream = long.result()
    assert long_stream.worker == old and drained_while_running == [True], \
        "the long stream ran on transformers while it was drained, and was not cut"
    by_order = sorted(streams, key=lambda s: s.order)
    assert by_order[0].worker == old, "before the build finished, transformers served"
    assert all(s.worker == new for s in streams if s.order in after_switch), "after the switch, llama.cpp serves"
    assert {s.worker for s in streams} == {old, new}
    assert http_results and all(finish in ("stop", "length") and text and done
                                for text, finish, done in http_results), http_results
    # The order of the switch: the new engine served before the old one was drained, which exited cleanly.
    serves = out.index(f"llama.cpp: engine {new} serves {DEFAULT_MODEL_ID}")
    assert serves < out.index("stopping engine (pid") < out.index("engine stopped (exit code 0)")
    old_pid = int(re.search(r"started engine \(pid (\d+)", out).group(1))
    assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
    assert os.path.exists(built)
    assert f"(its Prometheus metrics on :{up.metrics_port + 1}, free now)" in out
    # Its counter holds at least what the bus streams it ran generated (HTTP streams may add to it).
    new_tokens = sum(s.end.usage.completion_tokens for s in streams if s.worker == new)
    assert scraped_tokens >= new_tokens > 0, (scraped_tokens, new_tokens)
