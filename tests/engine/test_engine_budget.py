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


# -- the per-identity share (finding: 200 idle streams of one trainer held the whole budget,
# so every other trainer's save failed or waited behind all of them) --------------------


def test_an_identity_alone_may_take_the_whole_budget() -> None:
    async def scenario() -> int:
        budget = ByteBudget(100, share=0.5)
        for _ in range(4):
            await budget.acquire(25, wait=False, what="a", identity="a")
        return budget.held_bytes("a")

    assert asyncio.run(scenario()) == 100


def test_waiters_over_their_share_step_aside_for_another_identity() -> None:
    async def scenario() -> list[str]:
        budget = ByteBudget(100, share=0.5)
        order: list[str] = []
        for _ in range(4):
            await budget.acquire(25, wait=True, what="hog", identity="hog")

        async def take(name: str, identity: str) -> None:
            await budget.acquire(25, wait=True, what=name, identity=identity)
            order.append(name)

        hogs = [asyncio.create_task(take(f"hog{i}", "hog")) for i in range(200)]
        await asyncio.sleep(0)
        other = asyncio.create_task(take("other", "other"))
        await asyncio.sleep(0)
        assert budget.waiting == 201
        budget.release(25, "hog")  # room for one: "other" is behind 200, but they step aside
        await other
        assert order == ["other"] and budget.held_bytes("hog") == 75
        budget.release(25, "hog")
        budget.release(25, "hog")  # hog is back under its share of 50: its next waiter goes
        await asyncio.sleep(0)
        assert order == ["other", "hog0"] and budget.held_bytes("hog") == 50
        for task in hogs:
            task.cancel()
        await asyncio.gather(*hogs, return_exceptions=True)
        return order

    asyncio.run(scenario())


def test_fifo_holds_among_waiters_within_their_share() -> None:
    async def scenario() -> list[str]:
        budget = ByteBudget(100, share=0.5)
        order: list[str] = []
        await budget.acquire(60, wait=True, what="x", identity="x")

        async def take(name: str, nbytes: int, identity: str) -> None:
            await budget.acquire(nbytes, wait=True, what=name, identity=identity)
            order.append(name)

        big = asyncio.create_task(take("big", 80, "b"))  # holds nothing: within its share
        await asyncio.sleep(0)
        small = asyncio.create_task(take("small", 10, "c"))  # fits, but big is first in line
        await asyncio.sleep(0)
        assert not order
        budget.release(60, "x")
        await asyncio.gather(big, small)
        return order

    assert asyncio.run(scenario()) == ["big", "small"]


def test_a_save_larger_than_the_share_still_gets_in() -> None:
    async def scenario() -> int:
        budget = ByteBudget(100, share=0.25)
        await budget.acquire(10, wait=True, what="other", identity="other")
        await budget.acquire(80, wait=False, what="large", identity="large")
        return budget.held_bytes("large")

    assert asyncio.run(scenario()) == 80


def test_busy_error_names_the_share() -> None:
    async def scenario() -> None:
        budget = ByteBudget(100, share=0.5)
        await budget.acquire(60, wait=True, what="a", identity="a")
        await budget.acquire(10, wait=True, what="b", identity="b")
        with pytest.raises(BusyError, match=r"'a' already holds 60 bytes, over its share of 50"):
            await budget.acquire(10, wait=False, what="a2", identity="a")

    asyncio.run(scenario())
