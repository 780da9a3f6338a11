"""A coroutine's own CPU time, without what other tasks did while it waited."""

from __future__ import annotations

import asyncio
import time

import pytest

from node.ops.threads import CoroutineCpu


def _burn(seconds: float) -> None:
    """Spend ``seconds`` of this thread's CPU time."""
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        pass


def test_only_the_coroutines_own_steps_count():
    async def measured() -> str:
        _burn(0.02)
        await asyncio.sleep(0.05)  # meanwhile another task burns 0.2 s on this thread
        _burn(0.02)
        return "done"

    async def scenario() -> None:
        spent: list[float] = []

        async def neighbour() -> None:
            await asyncio.sleep(0.01)
            _burn(0.2)

        task = asyncio.create_task(neighbour())
        assert await CoroutineCpu(measured(), spent.append) == "done"
        await task
        total = sum(spent)
        # Its own 40 ms, and none of the neighbour's 200 ms (thread_time around the
        # await would have counted them).
        assert 0.04 <= total < 0.1, total
        assert len(spent) >= 2  # one entry per step

    asyncio.run(scenario())


def test_errors_and_cancellation_pass_through_and_still_count():
    async def failing() -> None:
        await asyncio.sleep(0)
        _burn(0.01)
        raise ValueError("broken")

    async def waiting(entered: asyncio.Event) -> None:
        try:
            entered.set()
            await asyncio.sleep(60)
        finally:
            _burn(0.01)  # cleanup runs inside the measured coroutine

    async def scenario() -> None:
        spent: list[float] = []
        with pytest.raises(ValueError, match="broken"):
            await CoroutineCpu(failing(), spent.append)
        assert sum(spent) >= 0.01

        spent.clear()
        entered = asyncio.Event()

        async def awaiting() -> None:
            await CoroutineCpu(waiting(entered), spent.append)

        task = asyncio.create_task(awaiting())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sum(spent) >= 0.01  # the cancellation reached the coroutine's cleanup

        # A timeout around it works as around the bare coroutine.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await CoroutineCpu(asyncio.sleep(60), spent.append)

    asyncio.run(scenario())
