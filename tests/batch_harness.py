"""Harness for the batch tests — no tests in here.

``LowLaneEngine`` plays the scheduler and one engine for the low lane only: it pulls what the
batch runners publish to ``llm.v1.infer.submit.low`` and answers it (or holds it unanswered),
recording every request it took. Helpers build batch input files and wait for a batch to end.
"""

from __future__ import annotations

import asyncio
import io
import json

import msgspec

from schemas import names
from schemas.events import StreamEnd, StreamStart, TokenDelta, Usage, encode
from schemas.inference import InferenceRequest
from services.common import bus
from services.common.lifecycle import cancel_and_wait
from tests.edge_harness import MODEL

TERMINAL = {"completed", "failed", "expired", "cancelled"}


class LowLaneEngine:
    """Answers low-lane requests with the prompt's last message echoed back; ``hold`` leaves them unanswered."""

    def __init__(self, nc, js, worker: str) -> None:
        self.nc, self.js, self.worker = nc, js, worker
        self.taken: list[InferenceRequest] = []
        self.hold = False
        self.answer_first: int | None = None  # answer only this many requests, hold the rest
        self.arrived = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self) -> LowLaneEngine:
        """Pull and answer until ``stop``."""
        sub = await self.js.pull_subscribe_bind(names.scheduler_durable("low"), names.INFER_STREAM)
        self._task = asyncio.create_task(self._serve(sub))
        return self

    async def stop(self) -> None:
        """Stop pulling."""
        if self._task is not None:
            await cancel_and_wait(self._task)

    async def _serve(self, sub) -> None:
        while True:
            try:
                msgs = await sub.fetch(16, timeout=1)
            except TimeoutError:
                continue
            for msg in msgs:
                await msg.ack()
                req = msgspec.json.decode(msg.data, type=InferenceRequest)
                self.taken.append(req)
                self.arrived.set()
                if not self.hold and (self.answer_first is None or len(self.taken) <= self.answer_first):
                    await self.answer(req)

    async def answer(self, req: InferenceRequest) -> None:
        """The whole stream of one answer: ``echo:<last message>``."""
        text = f"echo:{req.messages[-1].content}" if req.messages else f"echo:{req.prompt}"
        for event in (StreamStart(id=req.id, worker=self.worker, model=req.model, prompt_tokens=3),
                      TokenDelta(id=req.id, seq=1, text=text),
                      StreamEnd(id=req.id, seq=2, finish_reason="stop",
                                usage=Usage(prompt_tokens=3, completion_tokens=1))):
            await self.nc.publish(req.reply_to, encode(event))
        await bus.flush(self.nc)

    async def wait_taken(self, count: int, timeout: float = 30.0) -> None:
        """Wait until ``count`` requests were taken."""
        async with asyncio.timeout(timeout):
            while len(self.taken) < count:
                self.arrived.clear()
                await self.arrived.wait()


def chat_line(custom_id: str, content: str | None = None, **body) -> dict:
    """One input line calling chat completions for the test model."""
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": content or custom_id}],
                     "max_tokens": 4, "cache": False, **body}}


def jsonl(rows: list[dict]) -> io.BytesIO:
    """An input file of ``rows``."""
    return io.BytesIO(b"".join(json.dumps(row).encode() + b"\n" for row in rows))


async def wait_ended(sdk, batch_id: str, timeout: float = 60.0):
    """The batch once it reached a terminal status (polled through the SDK)."""
    async with asyncio.timeout(timeout):
        while True:
            batch = await sdk.batches.retrieve(batch_id)
            if batch.status in TERMINAL:
                return batch
            await asyncio.sleep(0.1)


def rows_of(content: bytes) -> list[dict]:
    """The JSON lines of a result file."""
    return [json.loads(line) for line in content.splitlines() if line.strip()]
