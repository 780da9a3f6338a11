"""A stop ends every task, even one that lost a cancellation (Python 3.11's wait_for)."""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest

from node.daemon import cancel_all

LOSES_CANCELLATION = sys.version_info < (3, 12)
"""python/cpython#86296: fixed in 3.12, where wait_for is built on asyncio.timeout."""


async def _loop_like_sync(turns: list[int], replied: asyncio.Future[None]) -> None:
    """Asks, waits for the answer with ``asyncio.wait_for`` (as aiomqtt waits for a
    PUBACK), and asks again, for ever."""
    while True:
        turns.append(1)
        await asyncio.wait_for(replied, 5)
        await asyncio.sleep(0.01)


async def _lose_one_cancellation() -> tuple[asyncio.Task[None], list[int]]:
    turns: list[int] = []
    replied: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(_loop_like_sync(turns, replied), name="sync")
    await asyncio.sleep(0.01)  # the task waits for its reply
    # The reply and the stop in the same turn of the loop: on 3.11 wait_for returns
    # the result and the cancellation is lost.
    replied.set_result(None)
    return task, turns


async def test_a_task_that_lost_its_cancellation_is_cancelled_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    task, turns = await _lose_one_cancellation()
    with caplog.at_level(logging.WARNING, logger="poc.node"):
        async with asyncio.timeout(10):
            await cancel_all([task], every_s=0.2)
    assert task.cancelled()
    if LOSES_CANCELLATION:  # the second cancellation ended it
        assert "event=task_cancel_again tasks=sync" in caplog.text
        assert len(turns) >= 2


async def test_tasks_that_honour_the_first_cancellation_end_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks = [asyncio.create_task(asyncio.sleep(60), name=f"t{i}") for i in range(3)]
    finished = asyncio.create_task(asyncio.sleep(0))
    await asyncio.sleep(0.01)
    with caplog.at_level(logging.WARNING, logger="poc.node"):
        async with asyncio.timeout(1):
            await cancel_all([*tasks, finished], every_s=5)
    assert all(t.cancelled() for t in tasks) and not finished.cancelled()
    assert "task_cancel_again" not in caplog.text


async def test_a_single_cancel_would_wait_for_ever_on_this_python() -> None:
    """The defect cancel_all answers: one cancel() and a wait never end."""
    task, _ = await _lose_one_cancellation()
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=0.5)
    lost = not done
    # One more cancel() can be lost the same way (the task spends a turn in
    # wait_for on a future already done each time round): end it as the node does.
    async with asyncio.timeout(10):
        await cancel_all([task], every_s=0.05)
    assert task.cancelled()
    assert lost == LOSES_CANCELLATION
