import asyncio

import pytest

from node.intake.admission import ByteBudget, RateLimiter


def test_rate_limiter_allows_a_burst_then_the_sustained_rate():
    limiter = RateLimiter(per_minute=60, burst=3)
    assert [limiter.allow(b"a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow(b"b", 0.0)  # another submitter has its own bucket
    assert not limiter.allow(b"a", 0.5)
    assert limiter.allow(b"a", 1.6)


def test_rate_limiter_memory_is_bounded():
    limiter = RateLimiter(per_minute=60, burst=1, capacity=10)
    for index in range(100):
        limiter.allow(index.to_bytes(4, "big"), 0.0)
    assert len(limiter._buckets) == 10


async def test_byte_budget_holds_callers_back_first_come_first_served():
    budget = ByteBudget(100)
    await budget.take(60)
    order: list[str] = []

    async def take(name: str, size: int) -> None:
        await budget.take(size)
        order.append(name)

    big = asyncio.create_task(take("big", 50))
    await asyncio.sleep(0)
    small = asyncio.create_task(take("small", 10))  # would fit, but "big" came first
    await asyncio.sleep(0.01)
    assert order == [] and budget.held == 60
    budget.give(60)
    await asyncio.gather(big, small)
    assert order == ["big", "small"] and budget.held == 60


async def test_a_holder_larger_than_the_budget_is_delayed_never_refused():
    budget = ByteBudget(100)
    await budget.take(30)
    huge = asyncio.create_task(budget.take(10_000))
    await asyncio.sleep(0.01)
    assert not huge.done()
    budget.give(30)
    await asyncio.wait_for(huge, 5)
    assert budget.held == 100
    budget.give(10_000)
    assert budget.held == 0


async def test_a_cancelled_waiter_leaves_the_budget_as_it_was():
    budget = ByteBudget(100)
    await budget.take(100)
    waiter = asyncio.create_task(budget.take(50))
    behind = asyncio.create_task(budget.take(20))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    budget.give(100)
    await asyncio.wait_for(behind, 5)
    assert budget.held == 20
