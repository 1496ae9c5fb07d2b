"""The loop side of a model thread: a consumer that falls behind gets the waiting tokens as one delta."""

from __future__ import annotations

import asyncio

from schemas.events import TokenLogprob
from services.engine.backend import Chunk, Finished
from services.engine.backends.model_thread import EventQueues


def _logprob(token: int) -> TokenLogprob:
    return TokenLogprob(token_id=token, token=str(token), logprob=-0.5, top=[])


async def _collect(queues: EventQueues, steps: list[list]) -> list:
    """Follow request ``r`` while a real thread delivers ``steps``: all before the first read."""
    async def submit() -> None:
        for step in steps:  # each delivery lands on the loop before to_thread's own completion does
            await asyncio.to_thread(queues.deliver, [("r", event) for event in step])

    return [event async for event in queues.follow("r", submit, lambda _: None)]


async def test_chunks_waiting_behind_a_slow_consumer_arrive_as_one_delta():
    queues = EventQueues()
    queues.bind(asyncio.get_running_loop())
    events = await _collect(queues, [[Chunk("Hel", [1], [_logprob(1)])], [Chunk("lo", [2], [_logprob(2)])],
                                     [Chunk(" you", [3], [_logprob(3)]), Finished("length", 7, 3, 0)]])
    assert len(events) == 2
    merged, end = events
    assert (merged.text, merged.token_ids) == ("Hello you", [1, 2, 3])
    assert [lp.token_id for lp in merged.logprobs] == [1, 2, 3]
    assert (end.reason, end.prompt_tokens, end.completion_tokens) == ("length", 7, 3)


async def test_a_consumer_that_keeps_up_gets_one_delta_per_step():
    queues = EventQueues()
    queues.bind(asyncio.get_running_loop())
    got: list = []
    steps = [[Chunk("a", [1])], [Chunk("b", [2])], [Finished("stop", 3, 2, 0)]]

    async def submit() -> None:
        await asyncio.to_thread(queues.deliver, [("r", steps[0][0])])

    async for event in queues.follow("r", submit, lambda _: None):
        got.append(event)
        if len(got) < len(steps):  # the next step only after this one was read
            await asyncio.to_thread(queues.deliver, [("r", steps[len(got)][0])])
    assert [(e.text, e.token_ids) for e in got[:2]] == [("a", [1]), ("b", [2])]
    assert got[2].reason == "stop"
    assert all(e.logprobs is None for e in got[:2])
