"""Steady streaming load on an edge, with what a client would notice counted (test support).

Each of ``concurrency`` clients sends streaming chat completions to the simulated engine one
after another (``cache: false``). Every answer is checked word for word against what the
simulated engine generates (``tok1 tok2 ...``): a missing or repeated token is a defect a
client would see.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass
class Outcome:
    """One request: when it ran, whether it ended well, and its longest silence."""

    started: float
    ended: float
    ok: bool
    text: str
    error: str = ""
    longest_gap: float = 0.0


@dataclass
class Load:
    """Streaming clients against ``url`` until ``stop()``; ``outcomes`` in completion order."""

    url: str
    model: str
    max_tokens: int = 16
    concurrency: int = 4
    outcomes: list[Outcome] = field(default_factory=list)
    in_flight: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task] = field(default_factory=list)

    @property
    def expected(self) -> str:
        """The simulated engine's whole answer."""
        return "".join(f"tok{i} " for i in range(1, self.max_tokens + 1))

    @property
    def stopped(self) -> bool:
        """``stop()`` was called."""
        return self._stop.is_set()

    def start(self) -> None:
        """Start the clients."""
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.concurrency)]

    async def stop(self) -> None:
        """Let every request under way finish, then stop."""
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._session.close()

    def after(self, t: float) -> list[Outcome]:
        """Requests that started or were still running at ``t``."""
        return [o for o in self.outcomes if o.ended >= t]

    async def until_completed_after(self, t: float, count: int, timeout: float = 120.0) -> None:
        """Wait until ``count`` requests started after ``t`` have ended."""
        deadline = time.monotonic() + timeout
        while sum(1 for o in self.outcomes if o.started >= t) < count:
            assert time.monotonic() < deadline, f"only {len(self.after(t))} requests ended since the fault"
            await asyncio.sleep(0.1)

    async def _client(self) -> None:
        while not self._stop.is_set():
            self.outcomes.append(await self._one())

    async def _one(self) -> Outcome:
        body = {"model": self.model, "messages": [{"role": "user", "content": "count"}], "stream": True,
                "max_tokens": self.max_tokens, "cache": False}
        started = last = time.monotonic()
        gap, parts, error = 0.0, [], ""
        self.in_flight += 1
        try:
            async with self._session.post(f"{self.url}/v1/chat/completions", json=body) as resp:
                if resp.status != 200:
                    return Outcome(started, time.monotonic(), False, "", f"HTTP {resp.status}: {await resp.text()}")
                async for raw in resp.content:
                    line = raw.strip()
                    if not line.startswith(b"data: "):
                        continue
                    now = time.monotonic()
                    gap, last = max(gap, now - last), now
                    if line == b"data: [DONE]":
                        break
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        error = json.dumps(chunk["error"])
                    for choice in chunk.get("choices", []):
                        parts.append(choice.get("delta", {}).get("content") or "")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            self.in_flight -= 1
        text = "".join(parts)
        return Outcome(started, time.monotonic(), not error and text == self.expected, text, error, gap)


def summary(outcomes: list[Outcome], expected: str) -> dict[str, float]:
    """Counts and the longest stall of ``outcomes`` (for docs/reliability.md)."""
    failed = [o for o in outcomes if o.error]
    wrong = [o for o in outcomes if not o.error and o.text != expected]
    return {"requests": len(outcomes), "failed": len(failed), "wrong_text": len(wrong),
            "longest_stall_s": round(max((o.longest_gap for o in outcomes), default=0.0), 2)}
