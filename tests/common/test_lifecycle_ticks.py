"""``lifecycle.ticks``: the beat of the loops that judge engines by their heartbeats.

A tick that comes more than an interval late (the event loop was held up while it waited) is
marked so the loop can skip it; only one in a row is.
"""

from __future__ import annotations

import asyncio
import time

from services.common.lifecycle import ticks

INTERVAL = 0.05


async def _held_up(beat) -> bool:
    """The next tick, with the event loop held up for three intervals while the tick waits."""
    tick = asyncio.ensure_future(anext(beat))
    await asyncio.sleep(0)  # the generator is asleep until its tick now
    time.sleep(3 * INTERVAL)
    return await tick


async def test_ticks_on_time_are_true_and_a_late_one_false_once():
    beat = ticks(INTERVAL)
    try:
        assert await anext(beat) is True
        assert await _held_up(beat) is False
        assert await anext(beat) is True  # back on time
        assert await _held_up(beat) is False
        assert await _held_up(beat) is True  # held up again at once: judged anyway, one tick late
    finally:
        await beat.aclose()
