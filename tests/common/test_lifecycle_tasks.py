"""Stopping background tasks: a cancellation lost inside ``asyncio.wait_for`` must not hang a stop.

On Python 3.11 a cancel that lands just as the future guarded by ``wait_for`` completes is lost
(``wait_for`` returns the result); every nats-py request runs under one. A scheduler's stats loop
lost its cancel this way in CI and ``Scheduler.stop`` waited for it until pytest-timeout.
"""

from __future__ import annotations

import asyncio

from services.common.lifecycle import cancel_and_wait
from tests.scheduler.test_scheduler_harness import engines, known, start_scheduler  # noqa: F401


async def test_a_task_that_loses_its_cancellation_is_cancelled_again():
    lost = 0

    async def loop_that_swallows_one_cancel() -> None:
        nonlocal lost
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                lost += 1
                if lost == 1:  # what wait_for does on 3.11 when its future is already done
                    continue
                raise

    task = asyncio.create_task(loop_that_swallows_one_cancel())
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await cancel_and_wait(task, None)
    assert task.cancelled() and lost == 2


async def test_failures_of_the_tasks_are_collected_not_raised():
    async def fails() -> None:
        raise RuntimeError("boom")

    done = asyncio.create_task(fails())
    running = asyncio.create_task(asyncio.sleep(10))
    await asyncio.sleep(0)
    await cancel_and_wait(done, running)
    assert isinstance(done.exception(), RuntimeError) and running.cancelled()


async def test_a_scheduler_stops_while_its_stats_loop_is_inside_a_jetstream_request(nc, start_scheduler, engines):
    """With a near-zero ``stats_interval`` the loop is almost always awaiting consumer info: a plain
    ``cancel()`` was lost in most of these stops before ``cancel_and_wait``."""
    engine = await engines("e", slots=1)
    for _ in range(15):
        async with asyncio.timeout(10):
            async with start_scheduler(stats_interval=0.0001) as scheduler:
                await known(scheduler, engine)
                await asyncio.sleep(0.02)
