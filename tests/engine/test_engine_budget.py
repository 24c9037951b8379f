"""The in-flight byte budget: FIFO-fair, refuses without waiting when asked, closes."""

from __future__ import annotations

import asyncio

import pytest
from ckptd.daemon.engine.budget import ByteBudget
from ckptd.daemon.errors import BusyError, ShuttingDownError


def test_budget_is_fifo_fair() -> None:
    async def scenario() -> list[str]:
        budget = ByteBudget(100)
        order: list[str] = []
        await budget.acquire(60, wait=True, what="first")

        async def take(name: str, nbytes: int) -> None:
            await budget.acquire(nbytes, wait=True, what=name)
            order.append(name)

        big = asyncio.create_task(take("big", 80))
        await asyncio.sleep(0)
        small = asyncio.create_task(take("small", 10))  # would fit, but big is first in line
        await asyncio.sleep(0)
        assert budget.waiting == 2 and not order
        with pytest.raises(BusyError, match=r"needs 5 bytes .* 60 are in use and 2 saves wait"):
            await budget.acquire(5, wait=False, what="eager")
        budget.release(60)
        await asyncio.gather(big, small)
        assert budget.in_use_bytes == 90
        blocked = asyncio.create_task(take("late", 50))
        await asyncio.sleep(0)
        budget.close("stopping")
        with pytest.raises(ShuttingDownError, match="stopping"):
            await blocked
        return order

    assert asyncio.run(scenario()) == ["big", "small"]


def test_budget_waiter_cancelled_gives_way() -> None:
    async def scenario() -> int:
        budget = ByteBudget(100)
        await budget.acquire(90, wait=True, what="a")
        stuck = asyncio.create_task(budget.acquire(50, wait=True, what="b"))
        await asyncio.sleep(0)
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck
        await budget.acquire(10, wait=False, what="c")
        return budget.in_use_bytes

    assert asyncio.run(scenario()) == 100
